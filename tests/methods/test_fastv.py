"""FastV top-k against a loop reference."""

import pytest
import torch

from vllm_vtprune.methods.fastv import last_token_image_attention, select


def reference(scores, k):
    vals = scores.double().tolist()
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    return sorted(order[: min(k, len(vals))])


@pytest.mark.parametrize("n,k", [(10, 3), (50, 20), (5, 5), (5, 9), (1, 1)])
def test_matches_reference(n, k):
    s = torch.rand(n)
    assert select(s, k).tolist() == reference(s, k)


def test_ties_go_to_lowest_index():
    s = torch.tensor([0.1, 0.5, 0.5, 0.5, 0.2])
    assert select(s, 2).tolist() == [1, 2]
    assert select(torch.zeros(6), 3).tolist() == [0, 1, 2]


def test_heads_are_averaged():
    a = torch.rand(4, 12)
    assert select(a, 5).tolist() == reference(a.mean(0), 5)


def test_last_token_row_and_image_columns():
    attn = torch.softmax(torch.randn(3, 9, 9), dim=-1)
    row = last_token_image_attention(attn, 2, 7)
    expected = [sum(attn[h, 8, j].item() for h in range(3)) / 3 for j in range(2, 7)]
    assert torch.allclose(row, torch.tensor(expected), atol=1e-6)
    with pytest.raises(ValueError):
        last_token_image_attention(attn, 5, 12)


def test_permutation_equivariant_and_deterministic():
    s = torch.rand(30)
    perm = torch.randperm(30)
    assert set(perm[select(s[perm], 7)].tolist()) == set(select(s, 7).tolist())
    assert torch.equal(select(s, 7), select(s.clone(), 7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    s = torch.rand(40).to(dtype)
    assert select(s, 10).tolist() == reference(s.float(), 10)


def test_non_finite_raises():
    with pytest.raises(ValueError):
        select(torch.tensor([0.1, float("nan")]), 1)
    with pytest.raises(ValueError):
        select(torch.tensor([0.1, float("inf")]), 1)
    with pytest.raises(ValueError):
        select(torch.rand(4), 0)
