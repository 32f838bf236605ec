"""ResPrune torch path against a slow reference written straight from the definition.

The reference (float64) projects every token onto the span of the selected tokens with
``torch.linalg.lstsq`` at every step and takes the argmax of the gated residual energy
in an explicit Python loop (Eq. (10)-(16) of the paper); it shares no code with
``vllm_vtprune.methods.resprune`` beyond the documented conventions (clamped gate,
relative round-off floor RTOL, fallback, lowest-index ties).
"""

from __future__ import annotations

import pytest
import torch

from vllm_vtprune.methods import resprune

RTOL = 1e-4  # the documented round-off floor, restated (not imported) on purpose
TIE = 1e-5  # documented relative tie window


def ref_argmax(cand, score):
    m = max(score[i] for i in cand)
    return min(i for i in cand if score[i] >= m * (1 - TIE))


# ----------------------------------------------------------------------------- reference
def ref_gate(v: torch.Tensor, text, alpha: float) -> list[float]:
    n = v.shape[0]
    if text is None or text.shape[0] == 0 or alpha == 0:
        return [1.0] * n
    dots = v @ text.T  # [N, T]
    den = v.norm(dim=1, keepdim=True) * text.norm(dim=1).unsqueeze(0)
    cos = torch.where(den > 0, dots / torch.where(den > 0, den, 1.0), 0.0)
    return [max(float(c), 0.0) ** alpha for c in cos.max(dim=1).values]


def ref_residual_energy(v: torch.Tensor, selected: list[int], i: int) -> float:
    x = v[i]
    if selected:
        a = v[selected].T  # [D, k]
        coef = torch.linalg.lstsq(a, x.unsqueeze(1), driver="gelsd").solution
        x = x - (a @ coef).squeeze(1)
    e = float(x @ x)
    return 0.0 if e <= RTOL * float(v[i] @ v[i]) else e


def ref_order(tokens, budget, text=None, alpha=0.75, seed=None, trace=None):
    v = tokens.detach().to(torch.float64)
    t = None if text is None else text.detach().to(torch.float64)
    n = v.shape[0]
    k = min(budget, n)
    g = ref_gate(v, t, alpha)
    if seed is None:
        norms = [float(v[i] @ v[i]) for i in range(n)]
        seed = ref_argmax(range(n), norms)
    order = [seed]
    while len(order) < k:
        cand = [i for i in range(n) if i not in order]
        e = {i: ref_residual_energy(v, order, i) for i in cand}
        score = {i: g[i] * e[i] for i in cand}
        if trace is not None:
            trace.append(score)
        best = ref_argmax(cand, score)
        if not score[best] > 0:
            best = ref_argmax(cand, e)
        order.append(best)
    return order


def assert_same_order_up_to_ties(tokens, got, text=None, alpha=0.75, seed=None, rel=1e-4):
    """Each pick of ``got`` must be a (near-)argmax of the reference score at that step."""
    v = tokens.detach().to(torch.float64)
    g = ref_gate(v, None if text is None else text.to(torch.float64), alpha)
    got = [int(i) for i in got]
    assert len(set(got)) == len(got)
    for step in range(1, len(got)):
        prefix = got[:step]
        cand = [i for i in range(v.shape[0]) if i not in prefix]
        e = {i: ref_residual_energy(v, prefix, i) for i in cand}
        s = {i: g[i] * e[i] for i in cand}
        m = max(s.values())
        use = s if m > 0 else e
        m = max(use.values())
        assert use[got[step]] >= m - rel * m, (step, got[step], use[got[step]], m)


def order(tokens, budget, text=None, alpha=0.75, seed=None):
    return resprune.select_order(tokens, budget, text, alpha, seed).tolist()


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("n,d,k", [(40, 64, 12), (33, 48, 33), (25, 128, 7)])
@pytest.mark.parametrize("use_text", [False, True])
def test_matches_reference_random(n, d, k, use_text):
    gen = torch.Generator().manual_seed(n * 1000 + d + k + use_text)
    x = torch.randn(n, d, generator=gen) * (1 + torch.rand(n, 1, generator=gen))
    text = torch.randn(3, d, generator=gen) if use_text else None
    got = order(x, k, text, 0.75)
    assert got == ref_order(x, k, text, 0.75)
    sel = resprune.select(x, k, text, 0.75)
    assert sel.dtype == torch.int64 and sel.shape == (k,)
    assert sel.tolist() == sorted(got)


def test_low_rank_exhaustion_then_lowest_index():
    # rank 5: after 5 picks all residuals are 0 -> remaining picks by lowest index
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 5, generator=gen) @ torch.randn(5, 32, generator=gen)
    got = order(x, 12)
    ref = ref_order(x, 12)
    assert got == ref
    first = got[:5]
    rest = [i for i in range(20) if i not in first][:7]
    assert got[5:] == rest


def test_duplicates_and_zero_vectors():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 16, generator=gen)
    x = torch.cat([base, base[:3], torch.zeros(2, 16), 3 * base[4:5]])  # 12 tokens
    for k in (6, 8, 12, 20):
        got = order(x, k)
        assert got == ref_order(x, k)
        assert len(set(got)) == min(k, 12)
    # the first 6 picks span everything; copies/zeros never come earlier, and of the
    # collinear pair (4, 11 = 3 * token 4) the one with 9x the energy is taken
    assert sorted(order(x, 6)) == [0, 1, 2, 3, 5, 11]


def test_all_collinear_and_all_zero():
    v = torch.randn(16, generator=torch.Generator().manual_seed(4))
    x = torch.stack([c * v for c in [1.0, -2.0, 0.5, 3.0, 3.0, 1.0]])
    assert order(x, 6) == [3, 0, 1, 2, 4, 5]  # seed = first largest norm, then lowest
    assert ref_order(x, 6) == [3, 0, 1, 2, 4, 5]
    z = torch.zeros(5, 8)
    assert order(z, 3) == [0, 1, 2]
    assert resprune.select(z, 9).tolist() == [0, 1, 2, 3, 4]


def test_single_token_and_budget_ge_n():
    x = torch.randn(1, 8)
    assert resprune.select(x, 1).tolist() == [0]
    assert resprune.select(x, 5, torch.randn(2, 8)).tolist() == [0]
    y = torch.randn(7, 4)
    assert resprune.select(y, 100).tolist() == list(range(7))
    assert order(y, 7) == ref_order(y, 7)


def test_seed_is_first_pick():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 40, generator=gen)
    for s in (0, 7, 29):
        got = order(x, 10, seed=s)
        assert got[0] == s
        assert got == ref_order(x, 10, seed=s)
    with pytest.raises(ValueError):
        resprune.select(x, 3, seed=30)
    with pytest.raises(ValueError):
        resprune.select(x, 3, seed=-1)


def test_default_seed_is_largest_norm():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(30, 40, generator=gen)
    x[17] *= 5
    assert order(x, 3)[0] == 17


def test_deterministic():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=gen)
    t = torch.randn(4, 32, generator=gen)
    a = resprune.select(x, 20, t)
    for _ in range(3):
        assert torch.equal(resprune.select(x.clone(), 20, t.clone()), a)


def test_permutation_equivariance():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(50, 64, generator=gen)
    t = torch.randn(3, 64, generator=gen)
    perm = torch.randperm(50, generator=gen)
    a = resprune.select(x, 15, t)
    b = resprune.select(x[perm], 15, t)
    assert sorted(perm[b].tolist()) == a.tolist()
    # with an explicit seed, moved along with the permutation
    inv = torch.argsort(perm)
    a = resprune.select(x, 15, t, seed=9)
    b = resprune.select(x[perm], 15, t, seed=int(inv[9]))
    assert sorted(perm[b].tolist()) == a.tolist()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(48, 64, generator=gen)).to(dtype)
    t = torch.randn(2, 64, generator=gen).to(dtype)
    got = order(x, 16, t)
    # fp32 math on the rounded values: same as the float64 reference on those values
    assert got == ref_order(x.float(), 16, t.float())
    assert resprune.select(x, 16, t).dtype == torch.int64


def test_text_gating_moves_selection_towards_text():
    gen = torch.Generator().manual_seed(8)
    d = 64
    x = torch.randn(60, d, generator=gen)
    target = torch.randn(d, generator=gen)
    # 10 tokens strongly aligned with the "noun"
    x[40:50] = target + 0.6 * torch.randn(10, d, generator=gen)
    text = target.unsqueeze(0)
    k = 12
    plain = set(resprune.select(x, k, None).tolist())
    gated = set(resprune.select(x, k, text, alpha=2.0).tolist())
    aligned = set(range(40, 50))
    assert len(gated & aligned) > len(plain & aligned)
    assert len(gated & aligned) >= 8
    assert order(x, k, text, 2.0) == ref_order(x, k, text, 2.0)
    # alpha = 0 is exactly the uniform gate; empty text is uniform too
    assert resprune.select(x, k, text, alpha=0.0).tolist() == sorted(plain)
    assert resprune.select(x, k, torch.zeros(0, d)).tolist() == sorted(plain)


def test_negative_relevance_clamped_to_zero_gate():
    # tokens anti-aligned with the text get gate 0: picked only after positive ones
    d = 8
    e = torch.eye(d)
    x = torch.cat([-e[:3] * 2.0, e[3:6]])  # 0..2 anti-aligned (big), 3..5 aligned
    text = (e[0] + e[1] + e[2] + e[3] + e[4] + e[5]).unsqueeze(0) * torch.tensor(
        [[-0.01, -0.01, -0.01, 1, 1, 1, 0, 0]]
    )
    got = order(x, 6, text, 0.75, seed=3)
    assert got[:3] == [3, 4, 5] or set(got[:3]) == {3, 4, 5}
    assert got == ref_order(x, 6, text, 0.75, seed=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_raise(bad):
    x = torch.randn(10, 8)
    x[3, 2] = bad
    with pytest.raises(ValueError):
        resprune.select(x, 4)
    t = torch.randn(2, 8)
    t[0, 0] = bad
    with pytest.raises(ValueError):
        resprune.select(torch.randn(10, 8), 4, t)


def test_bad_args():
    x = torch.randn(10, 8)
    with pytest.raises(ValueError):
        resprune.select(x, 0)
    with pytest.raises(ValueError):
        resprune.select(x, 3, alpha=-1.0)
    with pytest.raises(ValueError):
        resprune.select(x, 3, torch.randn(2, 7))
    with pytest.raises(ValueError):
        resprune.select(torch.randn(3, 4, 5), 2)


def test_select_batch_matches_rows():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 40, 32, generator=gen)
    texts = [torch.randn(2, 32, generator=gen), None, torch.randn(5, 32, generator=gen)]
    out = resprune.select_batch(x, 10, texts, 0.5, seeds=[1, None, 39])
    assert out.shape == (3, 10) and out.dtype == torch.int64
    for b in range(3):
        s = [1, None, 39][b]
        assert out[b].tolist() == resprune.select(x[b], 10, texts[b], 0.5, s).tolist()
        assert out[b].tolist() == sorted(ref_order(x[b], 10, texts[b], 0.5, s))


def test_reference_checker_can_fail():
    # guard: the tie-tolerant checker rejects a wrong order
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(20, 32, generator=gen)
    good = ref_order(x, 6)
    assert_same_order_up_to_ties(x, good)
    bad = good[:3] + [i for i in range(20) if i not in good][:3]
    with pytest.raises(AssertionError):
        assert_same_order_up_to_ties(x, bad)
