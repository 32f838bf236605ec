"""DCP-Prune against loop references written from Eqs. 1-24 of the paper."""

import math

import pytest
import torch

from tests.reference import cosine
from vllm_vtprune.methods import dcp

EPS = 1e-8


def _norm(a):
    return math.sqrt(sum(v * v for v in a))


def ref_kappa(kept, full):
    def stat(x):
        n, d = len(x), len(x[0])
        mu = [sum(r[c] for r in x) / n for c in range(d)]
        trace = sum(sum((r[c] - mu[c]) ** 2 for r in x) / n for c in range(d))
        m = sum(mu) / d
        return trace + d * sum((v - m) ** 2 for v in mu) / d
    return abs(stat(kept.double().tolist()) / stat(full.double().tolist()) - 1)


def ref_scores(y, cls_attn, x_in, x_att, x_ffn, attn, values):
    y, xi, xa, xf = (t.double().tolist() for t in (y, x_in, x_att, x_ffn))
    m = len(y)
    heads = len(cls_attn)
    a_cls = [sum(cls_attn[h][i].item() for h in range(heads)) / heads for i in range(m)]
    s_cls = [a / (sum(a_cls) + EPS) for a in a_cls]
    c = [1 - sum(cosine(y[i], y[j]) for j in range(m) if j != i) / (m - 1) for i in range(m)]
    s_cos = [v / (sum(c) + EPS) for v in c]
    s_var = [0.0] * m
    for xb in (xa, xf):
        dist = [1 - cosine(xi[i], xb[i]) for i in range(m)]
        z = sum(math.exp(v) for v in dist)
        for i in range(m):
            s_var[i] += math.exp(dist[i]) / z * _norm(xb[i]) / (_norm(xi[i]) + EPS)
    ah = len(attn)
    abar = [[sum(attn[h][i][k].item() for h in range(ah)) / ah for k in range(m)] for i in range(m)]
    vbar = [[sum(values[h][k][q].item() for h in range(ah)) / ah for q in range(values.shape[2])] for k in range(m)]
    s_abl = []
    for k in range(m):
        tot = 0.0
        for i in range(m):
            if i != k:
                tot += abar[i][k] / (1 - abar[i][k] + EPS) * _norm(y[i]) * _norm(vbar[k])
        s_abl.append(tot / (m - 1))
    return [s_cls[i] + s_cos[i] + s_var[i] + s_abl[i] for i in range(m)]


def ref_graph_update(y, anchors, context, pos, k_n=5, tau=10.0, alpha=0.1):
    y = y.double().tolist()
    pos = pos.double().tolist()
    out = []
    for j in anchors:
        edges = []
        for i in context:
            sq = sum((pos[i][q] - pos[j][q]) ** 2 for q in range(2))
            edges.append((cosine(y[i], y[j]) * math.exp(-sq / tau), i))
        top = sorted(edges, key=lambda e: (-e[0], e[1]))[:k_n]
        top = [(max(e, 0.0), i) for e, i in top]
        total = sum(e for e, _ in top)
        upd = list(y[j])
        if total > 0:
            for e, i in top:
                for q in range(len(upd)):
                    upd[q] += alpha * e / total * y[i][q]
        out.append(upd)
    return torch.tensor(out, dtype=torch.float64)


def _layer(m=16, d=6, heads=2):
    y = torch.randn(m, d)
    return dict(
        tokens=y,
        cls_attn=torch.softmax(torch.randn(heads, m), -1),
        x_in=torch.randn(m, d),
        x_att=torch.randn(m, d),
        x_ffn=y,
        attn=torch.softmax(torch.randn(heads, m, m), -1),
        values=torch.randn(heads, m, 4),
    )


def test_kappa_matches_reference_and_identity():
    full = torch.randn(30, 8)
    kept = full[:7]
    assert dcp.kappa(kept, full) == pytest.approx(ref_kappa(kept, full), rel=1e-6)
    assert dcp.kappa(full, full) == pytest.approx(0.0, abs=1e-12)
    assert isinstance(dcp.kappa(kept, full), float)
    assert dcp.kappa(full[:1], full) == pytest.approx(ref_kappa(full[:1], full), rel=1e-6)
    same = torch.ones(4, 3)
    assert dcp.kappa(same[:2], same) == 0.0
    assert dcp.kappa(kept.half(), full.half()) == pytest.approx(ref_kappa(kept.half().float(), full.half().float()), rel=1e-5)


def test_importance_scores_match_reference():
    L = _layer()
    got = dcp.importance_scores(**L)
    ref = torch.tensor(ref_scores(L["tokens"], L["cls_attn"], L["x_in"], L["x_att"], L["x_ffn"], L["attn"], L["values"]), dtype=torch.float64)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_individual_terms_are_normalised():
    L = _layer()
    assert dcp.cls_score(L["cls_attn"]).sum().item() == pytest.approx(1.0, abs=1e-6)
    assert dcp.cosine_score(L["tokens"]).sum().item() == pytest.approx(1.0, abs=1e-6)
    same = torch.ones(5, 3)
    assert torch.allclose(dcp.variation_score(same, same, same), torch.full((5,), 0.4), atol=1e-6)


def test_ablation_single_token_and_zero_vectors():
    assert dcp.ablation_score(torch.ones(1, 1), torch.randn(1, 3), torch.randn(1, 3)).tolist() == [0.0]
    y = torch.zeros(4, 3)
    assert torch.all(dcp.cosine_score(y) > 0)


def test_acgr_stage_matches_reference():
    L = _layer(m=25)
    pos = dcp.grid_positions(25)
    kept, new = dcp.acgr_stage(positions=pos, target=9, **L)
    scores = ref_scores(L["tokens"], L["cls_attn"], L["x_in"], L["x_att"], L["x_ffn"], L["attn"], L["values"])
    ranked = sorted(range(25), key=lambda i: (-scores[i], i))
    anchors = sorted(ranked[:9])
    context = sorted(ranked[9:])
    assert kept.tolist() == anchors
    ref = ref_graph_update(L["tokens"], anchors, context, pos)
    assert torch.allclose(new.double(), ref, atol=1e-5)


def test_graph_update_adversarial():
    x = torch.randn(9, 4)
    x[5] = 0.0
    x[6] = -x[0]
    x[7] = x[1]
    pos = dcp.grid_positions(9)
    anchors, context = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6, 7, 8])
    got = dcp.graph_update(x, anchors, context, pos, k_n=2)
    assert torch.allclose(got.double(), ref_graph_update(x, [0, 1, 2], [3, 4, 5, 6, 7, 8], pos, k_n=2), atol=1e-6)
    assert torch.equal(dcp.graph_update(x, anchors, torch.tensor([], dtype=torch.long), pos), x[anchors])


def test_acgr_stage_budget_n1_and_dtypes():
    L = _layer(m=4)
    kept, new = dcp.acgr_stage(positions=dcp.grid_positions(4), target=10, **L)
    assert kept.tolist() == [0, 1, 2, 3] and torch.allclose(new, L["tokens"])
    kept, new = dcp.acgr_stage(torch.randn(1, 3), 1, torch.zeros(1, 2))
    assert kept.tolist() == [0]
    L = _layer(m=16)
    pos = dcp.grid_positions(16)
    a = dcp.acgr_stage(positions=pos, target=5, **L)
    for dtype in (torch.float16, torch.bfloat16):
        Lh = {k: v.to(dtype) for k, v in L.items()}
        kept, new = dcp.acgr_stage(positions=pos, target=5, **Lh)
        assert new.dtype == dtype
        Lf = {k: v.float() for k, v in Lh.items()}
        assert torch.equal(kept, dcp.acgr_stage(positions=pos, target=5, **Lf)[0])
    assert torch.equal(a[0], dcp.acgr_stage(positions=pos, target=5, **L)[0])


def test_acgr_permutation_equivariant_without_positions():
    y = torch.randn(12, 5)
    perm = torch.randperm(12)
    pos = torch.zeros(12, 2)
    kept, new = dcp.acgr_stage(y, 4, pos)
    kept_p, new_p = dcp.acgr_stage(y[perm], 4, pos)
    assert set(perm[kept_p].tolist()) == set(kept.tolist())
    order = {int(perm[k]): row for k, row in zip(kept_p.tolist(), new_p)}
    for k, row in zip(kept.tolist(), new):
        assert torch.allclose(order[k], row, atol=1e-5)


def ref_greedy(x, k, cls_attn):
    rows = x.double().tolist()
    n = len(rows)
    a = [v / (sum(cls_attn.tolist()) + EPS) for v in cls_attn.double().tolist()]
    U, S = list(range(n)), []
    while len(S) < k:
        best, pick = -math.inf, None
        for i in U:
            g = sum(cosine(rows[i], rows[j]) for j in U) / len(U)
            g -= max((cosine(rows[i], rows[p]) for p in S), default=0.0)
            g += a[i]
            if g > best:
                best, pick = g, i
        S.append(pick)
        U.remove(pick)
    return S


def ref_tatcs(x, t, k, cls_attn, iters=3):
    rows = x.double().tolist()
    t = t.double().tolist()
    n = len(rows)
    centers = [list(rows[i]) for i in ref_greedy(x, k, cls_attn)]

    def sim(i, z):
        return cosine(rows[i], z) - abs(cosine(rows[i], t) - cosine(z, t))

    def assign(centers):
        out = []
        for i in range(n):
            s = [sim(i, z) for z in centers]
            out.append(max(range(k), key=lambda q: (s[q], -q)))
        return out

    for _ in range(iters):
        c = assign(centers)
        for q in range(k):
            members = [i for i in range(n) if c[i] == q]
            if members:
                centers[q] = [sum(rows[i][d] for i in members) / len(members) for d in range(len(rows[0]))]
    c = assign(centers)
    picked = {}
    for q in range(k):
        members = [i for i in range(n) if c[i] == q]
        if members:
            picked[q] = max(members, key=lambda i: (sim(i, centers[q]), -i))
    used = set(picked.values())
    for q in range(k):
        if q not in picked:
            cand = [i for i in range(n) if i not in used]
            picked[q] = max(cand, key=lambda i: (sim(i, centers[q]), -i))
            used.add(picked[q])
    return sorted(picked.values())


def test_greedy_init_matches_reference():
    x = torch.randn(15, 5)
    a = torch.rand(15)
    assert dcp.greedy_representative_init(x, 6, a).tolist() == ref_greedy(x, 6, a)


@pytest.mark.parametrize("n,k", [(20, 5), (12, 11), (30, 8)])
def test_tatcs_matches_reference(n, k):
    x = torch.randn(n, 6)
    t = torch.randn(6)
    a = torch.rand(n)
    got = dcp.tatcs_select(x, t, k, cls_attn=a)
    assert got.tolist() == ref_tatcs(x, t, k, a)
    assert len(set(got.tolist())) == k


def test_tatcs_adversarial_and_text_averaging():
    x = torch.randn(10, 4)
    x[3] = x[2]
    x[4] = 0.0
    x[5] = 2 * x[1]
    t = torch.randn(2, 4)
    got = dcp.tatcs_select(x, t, 4, cls_attn=torch.ones(10))
    assert got.tolist() == ref_tatcs(x, t.mean(0), 4, torch.ones(10))
    assert dcp.tatcs_select(x, t, 40).tolist() == list(range(10))
    assert dcp.tatcs_select(torch.randn(1, 4), t, 1).tolist() == [0]
    assert torch.equal(dcp.tatcs_select(x.half(), t, 4), dcp.tatcs_select(x.half().float(), t, 4))
    with pytest.raises(ValueError):
        dcp.tatcs_select(x, torch.randn(5), 3)


def test_final_stage_switches_on_kappa():
    y = torch.randn(30, 6)
    pos = dcp.grid_positions(30, width=6)
    t = torch.randn(6)
    kept, new, used = dcp.final_stage(y, 3, pos, t, delta=0.0)
    assert used and torch.equal(new, y[kept]) and kept.tolist() == dcp.tatcs_select(y, t, 3).tolist()
    kept, new, used = dcp.final_stage(y, 3, pos, t, delta=1e9)
    assert not used and torch.equal(kept, dcp.acgr_stage(y, 3, pos)[0])
    assert not dcp.final_stage(y, 3, pos, None, delta=0.0)[2]


def test_schedule():
    s = dcp.schedule(576, 64, 24)
    assert len(s) == 12 and s[-1] == 64 and s[0] < 576
    assert all(a >= b for a, b in zip(s, s[1:]))
    diffs = [a - b for a, b in zip([576] + s, s)]
    assert max(diffs) - min(diffs) <= 1
    assert dcp.schedule(10, 50, 4) == [10, 10]
    assert dcp.schedule(576, 16, 23, every=2)[-1] == 16
    with pytest.raises(ValueError):
        dcp.schedule(576, 16, 1)


@pytest.mark.parametrize("fn", ["kappa", "acgr", "tatcs", "cls"])
def test_non_finite_raises(fn):
    x = torch.randn(8, 4)
    x[1, 1] = float("nan")
    with pytest.raises(ValueError):
        if fn == "kappa":
            dcp.kappa(x, torch.randn(8, 4))
        elif fn == "acgr":
            dcp.acgr_stage(x, 3, torch.zeros(8, 2))
        elif fn == "tatcs":
            dcp.tatcs_select(torch.randn(8, 4), torch.tensor([1.0, float("inf"), 0, 0]), 3)
        else:
            dcp.cls_score(torch.tensor([1.0, float("inf")]))


def test_top_k_mask_is_a_stable_descending_sorts_first_k():
    gen = torch.Generator().manual_seed(5)
    e = torch.randint(0, 4, (7, 40), generator=gen).float()  # many ties
    for k in (1, 3, 5, 40):
        order = torch.sort(e, dim=1, descending=True, stable=True).indices[:, :k]
        want = torch.zeros_like(e, dtype=torch.bool).scatter_(1, order, True)
        assert torch.equal(dcp.top_k_mask(e, k), want)


def test_served_scores_equal_the_public_terms_with_head_averaged_attention():
    L = _layer(m=20, d=6, heads=3)
    want = dcp.importance_scores(**L)
    scores = dcp.StageScores(L["cls_attn"], L["x_in"], L["x_att"], L["attn"].mean(dim=0),
                             L["values"])
    got = dcp._importance(L["tokens"], scores)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
