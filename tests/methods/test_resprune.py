"""ResPrune torch path against a slow reference written straight from the definition.

The reference (``tests/reference.py``, float64) projects every token onto the span of
the current round's picks with ``torch.linalg.lstsq`` at every step and takes the argmax
of the gated residual energy in an explicit Python loop (Eq. (10)-(16) of the paper);
it shares no code with ``vllm_vtprune.methods.resprune`` beyond the documented
conventions (clamped gate, relative round-off floor RTOL, fallback, restart rule,
lowest-index ties).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.reference import (
    assert_resprune_order_up_to_ties,
    resprune_reference_order as ref_order,
    resprune_reference_trace,
)
from vllm_vtprune.methods import resprune


def order(tokens, budget, text=None, alpha=0.75, seed=None):
    return resprune.select_order(tokens, budget, text, alpha, seed).tolist()


def low_rank(n, rank, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen)


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


def gated_norm_argmax(x, rest, text, alpha=0.75):
    """Hand-derived first pick of a new round: the largest gate * ||v||^2 among rest."""
    g = torch.ones(x.shape[0])
    if text is not None:
        cos = torch.nn.functional.cosine_similarity(x[:, None], text[None], dim=2)
        g = cos.max(dim=1).values.clamp_min(0) ** alpha
    score = g * (x * x).sum(1)
    return max(rest, key=lambda i: (float(score[i]), -i))


@pytest.mark.parametrize("use_text", [False, True])
def test_low_rank_exhaustion_starts_a_new_round(use_text):
    # rank 5, budget 12: picks 1-5 span every token, so picks 6-10 are a second greedy
    # round over the remaining 15 tokens (seeded by the largest gated norm among them)
    # and picks 11-12 a third one over the last 10 -- not the lowest unselected indices
    x = low_rank(20, 5, 32, seed=1)
    text = torch.randn(2, 32, generator=torch.Generator().manual_seed(2)) if use_text else None
    got = order(x, 12, text)
    assert got == ref_order(x, 12, text)
    assert int(torch.linalg.matrix_rank(x[got[:5]])) == 5
    for lo, hi in ((5, 10), (10, 12)):
        rest = [i for i in range(20) if i not in got[:lo]]
        first = gated_norm_argmax(x, rest, text)
        again = order(x[rest], hi - lo, text, seed=rest.index(first))
        assert got[lo:hi] == [rest[j] for j in again], lo
    assert got[5:] != [i for i in range(20) if i not in got[:5]][:7]  # old raster tail


def test_exhaustion_tail_follows_the_tokens_not_their_positions():
    # no ties: permuting the rows permutes every pick, the tail after exhaustion too
    x = low_rank(20, 5, 32, seed=3)
    got = order(x, 12)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        perm = torch.randperm(20, generator=gen)
        assert [int(perm[i]) for i in order(x[perm], 12)] == got


def test_duplicates_and_zero_vectors():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 16, generator=gen)
    x = torch.cat([base, base[:3], torch.zeros(2, 16), 3 * base[4:5]])  # 12 tokens
    for k in (6, 8, 12, 20):
        got = order(x, k)
        assert got == ref_order(x, k)
        assert len(set(got)) == min(k, 12)
    got = order(x, 12)
    # round 1 spans everything: copies/zeros never come earlier, and of the collinear
    # pair (4, 11 = 3 * token 4) the one with 9x the energy is taken
    assert sorted(got[:6]) == [0, 1, 2, 3, 5, 11]
    # round 2: token 4 and the copies 6-8 (independent of each other) in greedy order;
    # then only zero vectors are left: every step restarts and takes the lowest index
    rest = [4, 6, 7, 8]
    assert got[6:10] == [rest[j] for j in order(x[rest], 4)]
    assert got[10:] == [9, 10]


def test_all_collinear_and_all_zero():
    v = torch.randn(16, generator=torch.Generator().manual_seed(4))
    x = torch.stack([c * v for c in [1.0, -2.0, 0.5, 3.0, 3.0, 1.0]])
    # one direction: every step exhausts it and restarts, so the picks go by norm
    # (largest first, ties to the lowest index), not by position
    assert order(x, 6) == [3, 4, 1, 0, 5, 2]
    assert ref_order(x, 6) == [3, 4, 1, 0, 5, 2]
    z = torch.zeros(5, 8)
    assert order(z, 3) == [0, 1, 2]
    assert resprune.select(z, 9).tolist() == [0, 1, 2, 3, 4]


def test_restart_ranks_by_gate_then_ungated_fallback():
    e = torch.eye(4)
    x = torch.stack([-e[0], -2 * e[0], 0.5 * e[0], -3 * e[0]])  # one direction
    text = e[:1]
    # seed 3 (largest norm); each later step restarts: the only token with a positive
    # gate (2) first, then the gate-0 tokens by ungated energy (1 before 0)
    assert order(x, 4, text) == [3, 2, 1, 0]
    assert ref_order(x, 4, text) == [3, 2, 1, 0]


def test_reference_trace_margins():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 40, generator=gen)
    t = torch.randn(2, 40, generator=gen)
    got, margins = resprune_reference_trace(x, 10, t, seed=4)
    assert got == ref_order(x, 10, t, seed=4) == order(x, 10, t, seed=4)
    assert len(margins) == 10 and margins[0] == math.inf
    assert all(0.0 < m < math.inf for m in margins[1:])
    # ties decided by the lowest index have margin 0: seed 3 vs 4, then 0 vs 5
    v = torch.randn(16, generator=gen)
    x = torch.stack([c * v for c in [1.0, -2.0, 0.5, 3.0, 3.0, 1.0]])
    got, margins = resprune_reference_trace(x, 6)
    assert got == [3, 4, 1, 0, 5, 2]
    assert margins[0] == 0.0 and margins[3] == 0.0
    assert margins[1] == pytest.approx(5 / 9) and margins[2] == pytest.approx(3 / 4)


@pytest.mark.parametrize("c,want", [(0.0101, [0, 1, 2]), (0.0099, [0, 2, 1])])
def test_reference_trace_margin_sees_a_token_near_its_floor(c, want):
    # token 1's residual after token 0 is c^2, within 2 % of its floor RTOL * ||v_1||^2:
    # above it, token 1 is the only one outside the span and is picked next; below it,
    # the round is exhausted and a new one starts with the larger token 2
    e = torch.eye(3)
    x = torch.stack([2 * e[0], e[0] + c * e[2], 1.2 * e[0]])
    got, margins = resprune_reference_trace(x, 3)
    assert got == order(x, 3) == want
    assert margins[1] < 0.05
    far = torch.stack([2 * e[0], e[0] + 0.5 * e[2], 1.2 * e[0]])
    assert resprune_reference_trace(far, 3)[1][1] > 0.5


def test_reference_trace_margin_sees_a_gate_at_the_clamp():
    # token 1 wins the gated stage only through a cosine of 1e-6: another float path
    # may clamp it to gate 0 and fall back to the ungated stage (token 2)
    e = torch.eye(4)
    x = torch.stack([3 * e[0], e[1] + 1e-6 * e[2], 2 * e[3]])
    got, margins = resprune_reference_trace(x, 2, e[2:3])
    assert got == order(x, 2, e[2:3]) == [0, 1]
    assert margins[1] < 1e-5


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
    assert_resprune_order_up_to_ties(x, good)
    bad = good[:3] + [i for i in range(20) if i not in good][:3]
    with pytest.raises(AssertionError):
        assert_resprune_order_up_to_ties(x, bad)
    # after exhaustion it follows the new round, and rejects the old raster-order tail
    x = low_rank(20, 5, 32, seed=1)
    good = ref_order(x, 12)
    assert_resprune_order_up_to_ties(x, good)
    raster = good[:5] + [i for i in range(20) if i not in good[:5]][:7]
    with pytest.raises(AssertionError):
        assert_resprune_order_up_to_ties(x, raster)


@pytest.mark.parametrize("k", [5, 40])
def test_gram_rows_on_demand_and_from_the_whole_gram_pick_alike(monkeypatch, k):
    """The two ways of reading pivot rows (``V v_p`` per pick, or rows of a precomputed
    G) are the same equation; both must match the float64 reference."""
    gen = torch.Generator().manual_seed(k)
    v = torch.randn(60, 24, generator=gen)
    text = torch.randn(3, 24, generator=gen)
    orders = []
    for share in (1.0, 0.0):  # 1.0: every pick reads V v_p; 0.0: always the whole G
        monkeypatch.setattr(resprune, "FULL_GRAM_SHARE", share)
        orders.append(order(v, k, text, 0.75))
    assert orders[0] == orders[1] == ref_order(v, k, text, 0.75)
