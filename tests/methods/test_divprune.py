"""DivPrune against a loop reference of its max-min rule (Alvar et al., "DivPrune:
Diversity-based Visual Token Pruning for Large Multimodal Models", arXiv 2503.02175)."""

import pytest
import torch

from tests.reference import cosine
from vllm_vtprune.methods.divprune import select


def reference(tokens, budget):
    rows = tokens.double().tolist()
    n = len(rows)
    k = min(budget, n)
    d = [[round(1.0 - cosine(rows[i], rows[j]), 6) for j in range(n)] for i in range(n)]
    if n == 1:
        return [0]
    best, first = -1.0, None
    for j in range(n):
        m = min(d[i][j] for i in range(n) if i != j)
        if m > best:
            best, first = m, j
    chosen = [first]
    while len(chosen) < k:
        best, nxt = -1.0, None
        for j in range(n):
            if j in chosen:
                continue
            m = min(d[j][s] for s in chosen)
            if m > best:
                best, nxt = m, j
        chosen.append(nxt)
    return sorted(chosen)


@pytest.mark.parametrize("n,d,budget", [(20, 8, 5), (40, 16, 10), (7, 3, 6), (30, 4, 1)])
def test_matches_reference_random(n, d, budget):
    x = torch.randn(n, d)
    out = select(x, budget)
    assert out.dtype == torch.int64
    assert out.tolist() == reference(x, budget)


def test_adversarial_duplicates_zero_and_collinear():
    base = torch.randn(6, 5)
    x = torch.cat([base, base[:3], torch.zeros(2, 5), 3.0 * base[:2], -base[:1]])
    for budget in (1, 3, 6, 10):
        assert select(x, budget).tolist() == reference(x, budget)


def test_duplicates_are_not_picked_twice_before_distinct_tokens():
    base = torch.eye(4)
    x = torch.cat([base, base])
    out = select(x, 4).tolist()
    assert out == [0, 1, 2, 3]


def test_small_and_large_budget():
    assert select(torch.randn(1, 4), 3).tolist() == [0]
    x = torch.randn(5, 4)
    assert select(x, 5).tolist() == [0, 1, 2, 3, 4]
    assert select(x, 50).tolist() == [0, 1, 2, 3, 4]


def test_output_ascending_and_unique():
    out = select(torch.randn(50, 8), 17)
    assert len(set(out.tolist())) == 17 and torch.all(out[1:] > out[:-1])


def test_deterministic():
    x = torch.randn(30, 8)
    assert torch.equal(select(x, 9), select(x.clone(), 9))


def test_permutation_equivariant():
    x = torch.randn(25, 6)
    perm = torch.randperm(25)
    a = set(select(x, 8).tolist())
    b = set(perm[select(x[perm], 8)].tolist())
    assert a == b


def test_scale_invariant():
    x = torch.randn(25, 6)
    assert torch.equal(select(x, 8), select(x * 7.5, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    x = torch.randn(20, 8).to(dtype)
    assert select(x, 6).tolist() == reference(x.float(), 6)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_raises(value):
    x = torch.randn(5, 3)
    x[2, 1] = value
    with pytest.raises(ValueError):
        select(x, 2)


def test_bad_budget_raises():
    with pytest.raises(ValueError):
        select(torch.randn(5, 3), 0)
