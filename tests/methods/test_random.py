"""The random baseline: uniform over patches, deterministic per image, nothing else."""
from __future__ import annotations

import math

import torch

from vllm_vtprune.methods import random as rnd


def test_distinct_sorted_and_budget_above_count_keeps_all():
    idx = rnd.select(576, 64, seed=3)
    assert idx.dtype == torch.int64 and idx.shape == (64,)
    assert idx.tolist() == sorted(set(idx.tolist())) and 0 <= idx.min() and idx.max() < 576
    assert rnd.select(10, 99, seed=3).tolist() == list(range(10))


def test_each_patch_is_equally_likely():
    """Counts over 4000 draws against the binomial k/n: within 5 standard deviations."""
    n, k, draws = 48, 12, 4000
    counts = torch.zeros(n)
    for seed in range(draws):
        counts[rnd.select(n, k, seed)] += 1
    p = k / n
    sd = math.sqrt(draws * p * (1 - p))
    assert (counts - draws * p).abs().max() < 5 * sd
    # not a fixed subset: every patch is drawn sometimes
    assert counts.min() > 0


def test_seeded_by_the_pixels_only():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 336, 336, generator=gen)
    same = image.clone()
    other = image.clone()
    other[0, 0, 0, 0] += 1e-3
    assert rnd.image_seed(image) == rnd.image_seed(same)
    assert rnd.image_seed(image) != rnd.image_seed(other)
    assert rnd.image_seed(image.to(torch.float64)) == rnd.image_seed(image)
    picks = {tuple(rnd.select(576, 64, rnd.image_seed(torch.rand(1, 3, 8, 8, generator=gen))).tolist())
             for _ in range(5)}
    assert len(picks) == 5
