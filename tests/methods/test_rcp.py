"""RCP modules against loop references written from Eqs. 1-21."""

import math

import pytest
import torch

from vllm_vtprune.methods import rcp


def _pruner(d=12, query_score="softmax"):
    torch.manual_seed(1)
    p = rcp.ResidualCrossAttentionPruner(d, num_queries=4, attn_dim=6, proj_dim=5,
                                         query_score=query_score)
    with torch.no_grad():  # a trained aggregate (the log form's starts at zero)
        p.aggregate.weight.normal_()
    return p


def ref_logits(p, h_v, h_q, q_len, a, prev):
    """Eqs. 1-5 for one sample with explicit loops; the pruning queries' softmax runs
    over the retained tokens (``prev`` > 0), as at inference where the others are gone.
    With ``p.query_score == "log"`` each query's attention enters S_q as Eq. 4 treats a_i:
    log minus its mean over the retained tokens (0 at the others)."""
    W = {k: v.double() for k, v in p.state_dict().items()}
    n, d = h_v.shape
    summary = [sum(h_q[t][c].item() for t in range(q_len)) / q_len for c in range(d)]
    Qp = W["queries"] + torch.tensor(summary, dtype=torch.float64)
    q = Qp @ W["q_proj.weight"].T
    k = h_v.double() @ W["k_proj.weight"].T
    agg = W["aggregate.weight"][0]
    S_q = []
    probs = []
    for j in range(q.shape[0]):
        logits = [float(q[j] @ k[i]) / math.sqrt(q.shape[1]) for i in range(n)]
        mx = max(logits[i] for i in range(n) if prev[i] > 0)
        e = [math.exp(l - mx) if prev[i] > 0 else 0.0 for i, l in enumerate(logits)]
        probs.append([x / sum(e) for x in e])
    if p.query_score == "log":
        kept = [i for i in range(n) if prev[i] > 0]
        for j, pj in enumerate(probs):
            mean = sum(math.log(pj[i]) for i in kept) / len(kept)
            probs[j] = [math.log(pj[i]) - mean if prev[i] > 0 else 0.0 for i in range(n)]
    for i in range(n):
        S_q.append(sum(agg[j].item() * probs[j][i] for j in range(q.shape[0])))
    proj = h_v.double() @ W["proj.weight"].T + W["proj.bias"]
    hid = torch.nn.functional.gelu(proj @ W["mlp.0.weight"].T + W["mlp.0.bias"])
    S_i = (hid @ W["mlp.2.weight"].T + W["mlp.2.bias"])[:, 0]
    logs = [math.log(a[i].item() + 1e-8) for i in range(n)]
    kept = [i for i in range(n) if prev[i] > 0]
    mean = sum(logs[i] for i in kept) / len(kept)
    return torch.tensor([logs[i] - mean + S_q[i] + S_i[i].item() + W["bias"].item() for i in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("query_score", rcp.QUERY_SCORES)
def test_pruner_logits_match_reference_with_padding(query_score):
    p = _pruner(query_score=query_score).eval()
    h_v, h_q = torch.randn(2, 7, 12), torch.randn(2, 5, 12)
    q_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    a = torch.softmax(torch.randn(2, 7), -1)
    prev = torch.tensor([[1, 1, 0, 1, 1, 0, 1], [1] * 7], dtype=torch.float32)
    with torch.no_grad():
        logits = p.logits(h_v, h_q, a, q_mask, prev)
    for b, q_len in enumerate((3, 5)):
        ref = ref_logits(p, h_v[b], h_q[b], q_len, a[b], prev[b])
        assert torch.allclose(logits[b].double(), ref, atol=1e-5)


def test_log_query_score_is_on_the_intrinsic_attentions_scale():
    """Why the log form exists: on the same attention over 56 tokens the
    literal softmax aggregate spans a small fraction of what the log form does; the log
    form is centred over the tokens, the softmax one sums to the number of queries."""
    torch.manual_seed(3)
    n = 56
    h_v, h_q = torch.randn(1, n, 12) * 3, torch.randn(1, 4, 12) * 3
    spans = {}
    for mode in rcp.QUERY_SCORES:
        p = _pruner(query_score=mode).eval()
        with torch.no_grad():
            p.aggregate.weight.fill_(1.0)  # each query counted once
            s_q = p.cross_attention_score(h_v, h_q, None)[0]
        spans[mode] = float(s_q.max() - s_q.min())
        if mode == "log":  # centred: zero mean up to float32 rounding of n terms
            assert abs(float(s_q.mean())) <= n * 1e-6 * float(s_q.abs().max())
        else:
            assert float(s_q.min()) >= 0 and abs(float(s_q.sum()) - 4.0) < 1e-4
    assert spans["log"] > 10 * spans["softmax"]


def test_log_query_score_starts_as_a_residual_at_zero():
    """Fresh log-form pruners add nothing to A + S_i (S_q = 0) yet get a gradient into
    their aggregate; the softmax form starts at the queries' mean."""
    torch.manual_seed(4)
    h_v, h_q = torch.randn(1, 7, 12), torch.randn(1, 3, 12)
    log_form = rcp.ResidualCrossAttentionPruner(12, query_score="log").eval()
    s_q = log_form.cross_attention_score(h_v, h_q, None)
    assert torch.equal(s_q, torch.zeros_like(s_q))
    (s_q * torch.randn_like(s_q)).sum().backward()
    assert log_form.aggregate.weight.grad.abs().sum() > 0
    plain = rcp.ResidualCrossAttentionPruner(12, query_score="softmax")
    assert torch.all(plain.aggregate.weight == 1 / 16)


def test_pruner_rejects_an_unknown_query_score():
    with pytest.raises(ValueError, match="query_score='linear'; accepted: softmax, log"):
        rcp.ResidualCrossAttentionPruner(8, query_score="linear")


def test_inference_mask_threshold_and_cumulative():
    p = _pruner().eval()
    h_v, h_q = torch.randn(1, 9, 12), torch.randn(1, 3, 12)
    a = torch.softmax(torch.randn(1, 9), -1)
    prev = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        logits, m, M = p(h_v, h_q, a, prev_mask=prev, tau=0.5)
    assert torch.equal(m, (logits > 0).float())
    assert torch.equal(M, prev * m)
    assert M[0, 1] == 0 and M[0, 4] == 0
    assert torch.equal(rcp.cumulative_mask(None, m), m)


def test_training_mask_is_binary_with_soft_gradient():
    p = _pruner().train()
    h_v, h_q = torch.randn(2, 6, 12), torch.randn(2, 3, 12)
    a = torch.softmax(torch.randn(2, 6), -1)
    logits, m, _ = p(h_v, h_q, a, tau=1.0)
    assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
    m.sum().backward()
    assert p.queries.grad is not None and p.mlp[0].weight.grad.abs().sum() > 0


def test_gumbel_sigmoid_forward_values_and_grad():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(13)).requires_grad_()
    m = rcp.gumbel_sigmoid_mask(logits, tau=0.7, generator=g)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(3)).clamp(1e-8, 1 - 1e-8)
    noisy = logits.detach() + torch.log(u) - torch.log(1 - u)
    soft = torch.sigmoid(noisy / 0.7)
    # log(1-u) here and log1p(-u) there differ in the last bits: the hard mask must agree
    # wherever the noisy logit is clear of the threshold by more than that
    clear = noisy.abs() > 1e-4
    assert int(clear.sum()) >= 995
    assert torch.equal(m.detach()[clear], (noisy[clear] > 0).float())
    m.sum().backward()
    assert torch.allclose(logits.grad, soft * (1 - soft) / 0.7, atol=1e-5)
    big = torch.full((2000,), 3.0)
    frac = rcp.gumbel_sigmoid_mask(big, 1.0).mean().item()
    assert abs(frac - torch.sigmoid(torch.tensor(3.0)).item()) < 0.05


def test_gumbel_sigmoid_noise_scale():
    """noise=0 is Eq. 8's threshold in the forward pass; a half scale halves the noise."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(14)).requires_grad_()
    # sigmoid(x / 0.3) rounds to exactly 0.5 for |x| below ~1e-7: keep the logits clear
    assert logits.detach().abs().min() > 1e-5
    m = rcp.gumbel_sigmoid_mask(logits, tau=0.3, noise=0.0)
    assert torch.equal(m.detach(), (logits.detach() > 0).float())
    m.sum().backward()
    soft = torch.sigmoid(logits.detach() / 0.3)
    assert torch.allclose(logits.grad, soft * (1 - soft) / 0.3, atol=1e-5)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(4)).clamp(1e-8, 1 - 1e-8)
    half = rcp.gumbel_sigmoid_mask(logits.detach(), 1.0, torch.Generator().manual_seed(4), 0.5)
    noisy = logits.detach() + 0.5 * (torch.log(u) - torch.log(1 - u))
    clear = noisy.abs() > 1e-4
    assert int(clear.sum()) >= 995
    assert torch.equal(half[clear], (noisy[clear] > 0).float())


def _topk_reference(noisy: list[float], live: list[bool], k: int):
    """Exactly k of the live tokens with the largest noisy logits, the threshold halfway
    between the k-th and (k+1)-th of them, and their gap, by sorting."""
    order = sorted((i for i, a in enumerate(live) if a), key=lambda i: (-noisy[i], i))
    chosen = set(order[:k])
    threshold = (noisy[order[k - 1]] + noisy[order[k]]) / 2
    gap = noisy[order[k - 1]] - noisy[order[k]]
    return [1.0 if i in chosen else 0.0 for i in range(len(noisy))], threshold, gap


@pytest.mark.parametrize("n,k,dead", [(37, 5, 9), (576, 29, 0), (64, 63, 0), (10, 1, 3)])
def test_gumbel_topk_mask_keeps_k_live_tokens_with_a_soft_gradient(n, k, dead):
    """Forward: the top k of the live tokens' noisy logits (Eq. 6's noise from the same
    generator); backward: sigmoid'((noisy - t) / tau) / tau on live tokens, 0 on dead."""
    torch.manual_seed(n + k)
    logits = (torch.randn(n) * 3).requires_grad_(True)
    live = torch.ones(n)
    live[torch.randperm(n)[:dead]] = 0.0
    tau = 0.6
    m = rcp.gumbel_topk_mask(logits, live, k, tau, generator=torch.Generator().manual_seed(7))
    u = torch.rand(n, generator=torch.Generator().manual_seed(7)).clamp(1e-8, 1 - 1e-8)
    noisy = [float(x) for x in logits.detach() + torch.log(u) - torch.log(1 - u)]
    hard, t, gap = _topk_reference(noisy, [bool(a) for a in live], k)
    # the reference's noise (log(1 - u)) and the mask's (log1p(-u)) differ by ~1e-7:
    # the chosen set is comparable exactly only when the k-th and (k+1)-th are further apart
    assert gap > 1e-4, gap
    assert m.detach().tolist() == hard
    weights = torch.randn(n)
    (m * weights).sum().backward()
    for i in range(n):
        soft = 1 / (1 + math.exp(-(noisy[i] - t) / tau))
        want = weights[i].item() * soft * (1 - soft) / tau if live[i] else 0.0
        assert abs(logits.grad[i].item() - want) <= 1e-5 * (1 + abs(want)), i


def test_gumbel_topk_mask_without_noise_is_the_top_k_of_the_logits():
    logits = torch.tensor([0.5, -2.0, 3.0, 1.0, 0.7])
    live = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    m = rcp.gumbel_topk_mask(logits, live, 2, 0.2, noise=0.0)
    assert m.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # 3.0 is dead; 1.0 and 0.7 stay
    assert rcp.gumbel_topk_mask(logits, live, 9, 0.2, noise=0.0).tolist() == live.tolist()


def _layer_average(num_layers: int, n: int, counts: dict[int, int]) -> float:
    """Eq. 20's r_bar times N, layer by layer: full before the first pruning layer, each
    pruning layer's count from it on."""
    per_layer = []
    for layer in range(num_layers):
        live = [counts[l] for l in sorted(counts) if l <= layer]
        per_layer.append(live[-1] if live else n)
    return sum(per_layer) / num_layers


def _slow_plan(layers, n, budget, share, num_layers=16):
    """Every first count from n down: the largest whose decay (each later layer ``share``
    of the one before, or with a list its own share, rounded, at least 1) averages within
    the budget."""
    shares = share if isinstance(share, list) else [share] * (len(layers) - 1)
    for first in range(n, 0, -1):
        counts = {layers[0]: first}
        for prev, layer, x in zip(layers, layers[1:], shares):
            counts[layer] = max(1, round(x * counts[prev]))
        if _layer_average(num_layers, n, counts) <= budget:
            return counts
    return counts


def test_planned_counts_decay_as_table_vi_and_fill_the_layer_average_budget():
    """Each later pruning layer keeps LATER_SHARE (Table VI: 16.72 % -> 4.59 % -> 1.44 %,
    ratios 0.27 and 0.31) of the one before; the first keeps the most the layer-averaged
    budget allows, found here by trying every count."""
    assert 0.27 <= rcp.LATER_SHARE <= 0.31
    for layers, n, budget in (((1, 7, 13), 576, 64), ((1, 7, 13), 576, 128),
                              ((1, 7, 13), 576, 192), ((1, 2, 4), 576, 100),
                              ((3, 9), 577, 150), ((1, 7, 13), 2880, 640)):
        counts = rcp.planned_counts(16, layers, n, budget)
        assert counts == _slow_plan(layers, n, budget, rcp.LATER_SHARE), (layers, n, budget)
        assert budget - 1 < _layer_average(16, n, counts) <= budget or counts[layers[-1]] == 1
    # e.g. rcp:64 on 576 tokens at layers 1/7/13 of 16: 56, 16, 5 tokens (average 63.9)
    assert rcp.planned_counts(16, (1, 7, 13), 576, 64) == _slow_plan((1, 7, 13), 576, 64, 0.29)


def test_planned_counts_with_a_share_per_later_layer():
    """A list gives each later pruning layer its own share of the one before: a heavier
    last stage (e.g. 52, 16 and 13 tokens at 64), found here by trying every count; a
    list of the wrong length or a share outside (0, 1] is refused by name."""
    shares = [0.31, 0.81]
    for n, budget in ((576, 64), (576, 128), (576, 192), (577, 100), (2880, 640)):
        counts = rcp.planned_counts(16, (1, 7, 13), n, budget, shares)
        assert counts == _slow_plan((1, 7, 13), n, budget, shares), (n, budget)
        assert budget - 1 < _layer_average(16, n, counts) <= budget
    assert rcp.planned_counts(16, (1, 7, 13), 576, 64, shares) == {1: 52, 7: 16, 13: 13}
    assert (rcp.planned_counts(16, (1, 7, 13), 576, 64, [0.29, 0.29])
            == rcp.planned_counts(16, (1, 7, 13), 576, 64, 0.29))
    for bad in ([0.3], [0.3, 0.3, 0.3], [0.3, 0.0], [1.2, 0.5]):
        with pytest.raises(ValueError, match="later_share"):
            rcp.planned_counts(16, (1, 7, 13), 576, 64, bad)
    near = rcp.planned_counts(16, (1, 7, 13), 576, 500, shares)
    assert near[1] == 576 and 499 <= _layer_average(16, 576, near) <= 500


def test_planned_counts_below_the_first_layers_floor_keep_one_token():
    """A budget under the tokens every layer before the first pruning one sees (576 / 16
    = 36 here) cannot be met: one token stays from the first pruning layer on."""
    for budget in (1, 16, 32, 36):
        assert rcp.planned_counts(16, (1, 7, 13), 576, budget) == {1: 1, 7: 1, 13: 1}


def test_planned_counts_near_the_token_count_raise_the_later_share():
    """When the first pruning layer keeps every token, the later ones keep more than
    LATER_SHARE so that the average still comes within a token of the budget."""
    for budget in (400, 500, 575):
        counts = rcp.planned_counts(16, (1, 7, 13), 576, budget)
        assert counts[1] == 576
        assert counts[7] / 576 > rcp.LATER_SHARE
        assert budget - 1 <= _layer_average(16, 576, counts) <= budget


def test_query_dropout_only_in_training():
    p = _pruner()
    assert p.query_dropout == 0.2 and rcp.ResidualCrossAttentionPruner(8).num_queries == 16
    h_v, h_q = torch.randn(1, 6, 12), torch.randn(1, 3, 12)
    p.eval()
    a1 = p.cross_attention_score(h_v, h_q, None)
    assert torch.equal(a1, p.cross_attention_score(h_v, h_q, None))
    p.train()
    torch.manual_seed(5)
    outs = {tuple(p.cross_attention_score(h_v, h_q, None).detach().round(decimals=6).tolist()[0]) for _ in range(10)}
    assert len(outs) > 1


def test_attention_logit_and_intrinsic_attention():
    attn = torch.softmax(torch.randn(2, 3, 4, 5), -1)
    a = rcp.intrinsic_attention(attn)
    ref = [[sum(attn[b, h, q, i].item() for h in range(3) for q in range(4)) / 12 for i in range(5)] for b in range(2)]
    assert torch.allclose(a, torch.tensor(ref), atol=1e-6)
    A = rcp.attention_logit(a)
    assert torch.allclose(A.sum(-1), torch.zeros(2), atol=1e-5)
    with pytest.raises(ValueError):
        rcp.intrinsic_attention(torch.full((1, 1, 1, 2), float("nan")))


def test_intrinsic_attention_at_the_last_question_row():
    """rows="last": the last question row (the prompt's last token, FastV's) averaged
    over heads only, element by element."""
    attn = torch.softmax(torch.randn(2, 3, 4, 5), -1)
    a = rcp.intrinsic_attention(attn, "last")
    ref = [[sum(attn[b, h, 3, i].item() for h in range(3)) / 3 for i in range(5)] for b in range(2)]
    assert torch.allclose(a, torch.tensor(ref), atol=1e-6)
    assert not torch.allclose(a, rcp.intrinsic_attention(attn), atol=1e-3)
    with pytest.raises(ValueError, match="intrinsic_rows='first'; accepted: mean, last"):
        rcp.intrinsic_attention(attn, "first")
    with pytest.raises(ValueError, match="intrinsic_rows='max'; accepted: mean, last"):
        rcp.ResidualCrossAttentionPruner(8, intrinsic_rows="max")


def test_pruner_rejects_non_finite():
    p = _pruner().eval()
    h_v = torch.randn(1, 4, 12)
    h_v[0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        p(h_v, torch.randn(1, 2, 12), torch.rand(1, 4))


def ref_adapter(ad, x, keep, pos, h_v, g):
    W = {k: v.double() for k, v in ad.state_dict().items()}
    n = keep.shape[0]
    mp = [[keep[i].item() * pos[i][c].item() for c in range(pos.shape[1])] for i in range(n)]
    logits = [sum(W["mask_query"][c].item() * mp[i][c] for c in range(pos.shape[1])) for i in range(n)]
    mx = max(logits)
    e = [math.exp(l - mx) for l in logits]
    att = [sum(e[i] / sum(e) * mp[i][c] for i in range(n)) for c in range(pos.shape[1])]
    e_mask = torch.tensor(att, dtype=torch.float64) @ W["mask_proj.weight"].T + W["mask_proj.bias"]
    dropped = [i for i in range(n) if keep[i] == 0]
    mean = sum(h_v[i].double() for i in dropped) / len(dropped)
    e_pruned = mean @ W["pruned_proj.weight"].T + W["pruned_proj.bias"]
    out = []
    for t in range(x.shape[0]):
        xt = x[t].double()
        cond = e_mask + e_pruned + xt @ W["query_proj.weight"].T + W["query_proj.bias"]
        gamma = 1 + cond @ W["w_gamma.weight"].T + W["w_gamma.bias"]
        beta = cond @ W["w_beta.weight"].T + W["w_beta.bias"]
        hidden = torch.nn.functional.gelu(xt @ W["down.weight"].T + W["down.bias"])
        delta = W["gate"] * ((gamma * hidden + beta) @ W["up.weight"].T + W["up.bias"])
        out.append(xt + g[t].item() * delta)
    return torch.stack(out)


def test_adapter_identity_at_init():
    ad = rcp.DelayedRepairAdapter(10, bottleneck=4)
    x = torch.randn(2, 5, 10)
    keep = (torch.rand(2, 7) > 0.5).float()
    ctx = ad.context(keep, torch.randn(7, 10), torch.randn(2, 7, 10))
    assert torch.equal(ad(x, ctx, torch.ones(2, 5)), x)


def test_adapter_matches_reference_after_training_step():
    torch.manual_seed(2)
    ad = rcp.DelayedRepairAdapter(10, bottleneck=4, pos_dim=6)
    with torch.no_grad():
        for prm in ad.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    x, h_v, pos = torch.randn(1, 5, 10), torch.randn(1, 7, 10), torch.randn(7, 6)
    keep = torch.tensor([[1, 0, 1, 0, 1, 1, 0]], dtype=torch.float32)
    g = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        out = ad(x, ad.context(keep, pos, h_v), g)
    ref = ref_adapter(ad, x[0], keep[0], pos, h_v[0], g[0])
    assert torch.allclose(out[0].double(), ref, atol=1e-5)
    assert torch.equal(out[0, :2], x[0, :2])


def test_adapter_gets_gradient():
    ad = rcp.DelayedRepairAdapter(8, bottleneck=4)
    x = torch.randn(1, 3, 8)
    ctx = ad.context(torch.tensor([[1.0, 0.0, 1.0]]), torch.randn(3, 8), torch.randn(1, 3, 8))
    ad(x, ctx, torch.ones(1, 3)).pow(2).sum().backward()
    assert ad.up.weight.grad.abs().sum() > 0


def ref_repair(s, t):
    S, T = s.double().tolist(), t.double().tolist()
    d = len(S[0])
    tot = 0.0
    for c in range(d):
        ms = sum(r[c] for r in S) / len(S)
        mt = sum(r[c] for r in T) / len(T)
        vs = sum(r[c] ** 2 for r in S) / len(S) - ms**2
        vt = sum(r[c] ** 2 for r in T) / len(T) - mt**2
        tot += (ms - mt) ** 2 + (math.sqrt(max(vs, 0) + 1e-8) - math.sqrt(max(vt, 0) + 1e-8)) ** 2
    return tot / d


def test_repair_loss_matches_reference():
    s, t = torch.randn(6, 5), torch.randn(9, 5) * 2 + 1
    assert rcp.repair_loss(s, t).item() == pytest.approx(ref_repair(s, t), rel=1e-5)
    assert rcp.repair_loss(t, t).item() == pytest.approx(0.0, abs=1e-10)
    s2, t2 = torch.randn(4, 5), torch.randn(4, 5)
    both = rcp.repair_loss([s, s2], [t, t2]).item()
    assert both == pytest.approx((ref_repair(s, t) + ref_repair(s2, t2)) / 2, rel=1e-5)
    z = torch.zeros(3, 5, requires_grad=True)
    rcp.repair_loss(z, torch.zeros(3, 5)).backward()
    assert torch.isfinite(z.grad).all()
    assert rcp.repair_loss(s.half(), t.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError):
        rcp.repair_loss(torch.full((2, 5), float("nan")), t)


def test_retention_and_sparsity_loss():
    n = 10
    m5 = torch.tensor([1.0] * 6 + [0.0] * 4)
    m8 = torch.tensor([1.0] * 3 + [0.0] * 7)
    rates = rcp.retention_rates({5: m5, 8: m8}, 10, n)
    assert rates.tolist() == pytest.approx([1.0] * 5 + [0.6] * 3 + [0.3] * 2)
    rbar = (5 * 1.0 + 3 * 0.6 + 2 * 0.3) / 10
    assert rcp.sparsity_loss({5: m5, 8: m8}, 10, n, 0.5).item() == pytest.approx(abs(rbar - 0.5))
    batched = rcp.sparsity_loss({5: torch.stack([m5, m8])}, 10, n, 0.2)
    expected = (abs((5 + 5 * 0.6) / 10 - 0.2) + abs((5 + 5 * 0.3) / 10 - 0.2)) / 2
    assert batched.item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        rcp.retention_rates({12: m5}, 10, n)


@pytest.mark.parametrize("budget,pruned", [(576, False), (1000, False), (575, True)])
def test_budget_at_the_token_count_keeps_everything(rcp_checkpoint, budget, pruned):
    """As for every other method, rcp:K with K at or above the image's tokens prunes
    nothing (no decision, no adapter); one token fewer prunes."""
    from vllm_vtprune import spec as spec_mod

    plan = rcp.llm_plan(spec_mod.parse(f"rcp:{budget},ckpt={rcp_checkpoint}"), [(5, 581)], 8, 576)
    assert bool(plan.decisions) is pruned and bool(plan.adapters) is pruned


def _saved_without(modules, key: str, tmp_path) -> str:
    """``modules`` saved as a checkpoint written before config ``key`` existed."""
    import json

    from safetensors.torch import save_file

    config = {k: v for k, v in modules.config.items() if k != key}
    path = str(tmp_path / f"without-{key}.safetensors")
    save_file(modules.tensors(), path, metadata={
        "format": rcp.CHECKPOINT_FORMAT, "hidden_size": str(modules.hidden_size),
        "num_layers": str(modules.num_layers), "config": json.dumps(config), "info": "{}"})
    return path


def test_checkpoints_carry_the_plan_they_were_trained_for(tmp_path):
    """Fresh modules plan with LATER_SHARE and save it; a checkpoint written before the
    plan decayed (no later_share in its config) serves the flat plan it trained with."""
    fresh = rcp.build_modules(16, 16, seed=0)
    assert fresh.later_share == rcp.LATER_SHARE
    path = str(tmp_path / "fresh.safetensors")
    rcp.save_checkpoint(fresh, path)
    loaded = rcp.load_checkpoint(path)
    assert loaded.later_share == rcp.LATER_SHARE
    assert loaded.plan(576, 64) == _slow_plan(list(loaded.pruning_layers), 576, 64, 0.29)

    old = rcp.load_checkpoint(_saved_without(fresh, "later_share", tmp_path))
    assert old.later_share == rcp.LEGACY_LATER_SHARE == 0.95
    assert old.plan(576, 64) == _slow_plan(list(old.pruning_layers), 576, 64, 0.95)


def test_checkpoints_carry_how_their_pruners_score_the_queries(tmp_path):
    """Pruners of either query_score save it and load with it (fresh ones: the log
    form); a checkpoint without the key (trained before it existed) aggregates Eq. 2's
    softmax weights, and its logits are the literal equation's (the reference's)."""
    assert rcp.build_modules(16, 16, seed=0).config["query_score"] == rcp.QUERY_SCORE == "log"
    for form in rcp.QUERY_SCORES:
        path = str(tmp_path / f"{form}.safetensors")
        rcp.save_checkpoint(rcp.build_modules(16, 16, seed=0, query_score=form), path)
        assert {p.query_score for p in rcp.load_checkpoint(path).pruners.values()} == {form}
    for rows in rcp.INTRINSIC_ROWS:
        path = str(tmp_path / f"rows-{rows}.safetensors")
        rcp.save_checkpoint(rcp.build_modules(16, 16, seed=0, intrinsic_rows=rows), path)
        assert {p.intrinsic_rows for p in rcp.load_checkpoint(path).pruners.values()} == {rows}
    logged = rcp.build_modules(16, 16, seed=0, query_score="log")
    assert {p.intrinsic_rows for p in logged.pruners.values()} == {rcp.INTRINSIC_ROW}
    without = rcp.load_checkpoint(_saved_without(logged, "intrinsic_rows", tmp_path))
    assert {p.intrinsic_rows for p in without.pruners.values()} == {"mean"}  # legacy

    old = rcp.load_checkpoint(_saved_without(logged, "query_score", tmp_path))
    pruner = old.pruners[old.pruning_layers[0]]
    assert pruner.query_score == rcp.LEGACY_QUERY_SCORE == "softmax"
    h_v, h_q = torch.randn(1, 9, 16), torch.randn(1, 3, 16)
    a, prev = torch.softmax(torch.randn(1, 9), -1), torch.ones(1, 9)
    with torch.no_grad():
        got = pruner.logits(h_v, h_q, a, None, prev)[0].double()
    assert torch.allclose(got, ref_logits(pruner, h_v[0], h_q[0], 3, a[0], prev[0]), atol=1e-5)


def _slow_served_choice(logits: list[float], cap: int) -> list[int]:
    """Eq. 8 token by token: those with sigmoid(logit) > 0.5, highest first (lower index
    on ties), at most cap; none over the threshold: the single highest logit."""
    over = [i for i, x in enumerate(logits) if 1 / (1 + math.exp(-x)) > 0.5]
    ranked = sorted(over, key=lambda i: (-logits[i], i))[:cap]
    return ranked or [max(range(len(logits)), key=lambda i: (logits[i], -i))]


@pytest.mark.parametrize("logits,cap", [
    ([0.5, -1.0, 2.0, 0.25, -3.0], 2),       # the cap decides
    ([0.5, -1.0, 2.0, 0.25, -3.0], 9),       # the threshold decides
    ([-0.5, -0.1, -2.0, -0.3], 3),           # none over it: the highest, not index 0
    ([1.0, 1.0, -1.0, 1.0], 2),              # ties go to the lower index
])
def test_served_choice_is_eq8_capped(logits, cap):
    got = rcp.served_choice(torch.tensor(logits), cap).tolist()
    assert got == _slow_served_choice(logits, cap)


def test_served_choice_on_random_logits_matches_the_slow_rule():
    g = torch.Generator().manual_seed(5)
    for n, cap in ((7, 3), (50, 10), (50, 60), (1, 1)):
        logits = torch.randn(n, generator=g) - 0.5
        assert rcp.served_choice(logits, cap).tolist() == _slow_served_choice(logits.tolist(), cap)
