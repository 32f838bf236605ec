"""bench/rcp_diagnosis.py's coverage oracle: its top K covers every asked-about object's
centre before any object's second patch, checked against a brute-force geometry."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from vllm_vtprune.data import shapes_vqa as sv

_spec = importlib.util.spec_from_file_location(
    "bench_rcp_diagnosis", Path(__file__).resolve().parents[1] / "bench" / "rcp_diagnosis.py")
diagnosis = importlib.util.module_from_spec(_spec)
sys.modules["bench_rcp_diagnosis"] = diagnosis
_spec.loader.exec_module(diagnosis)

GRID = sv.IMAGE_SIZE // sv.PATCH


def _nearest_patch_distance(obj) -> float:
    """The smallest squared distance from the object's centre to the centre of a patch its
    box overlaps (every patch, one by one)."""
    x0, y0, x1, y1 = obj.box
    best = float("inf")
    for row in range(GRID):
        for col in range(GRID):
            px0, py0 = col * sv.PATCH, row * sv.PATCH
            if px0 < x1 and px0 + sv.PATCH > x0 and py0 < y1 and py0 + sv.PATCH > y0:
                cx, cy = px0 + sv.PATCH / 2, py0 + sv.PATCH / 2
                best = min(best, (cx - obj.cx) ** 2 + (cy - obj.cy) ** 2)
    return best


@pytest.mark.parametrize("index", [20_000, 20_001, 20_002])
def test_top_k_covers_each_object_centre_first(index):
    sample = sv.make_sample(sv.HARD.heldout_seed, index, split="hard")
    scores = diagnosis.coverage_scores(sample.objects, GRID)
    on = sv.object_patches(sample.objects)
    assert bool(((scores > -1e9).numpy() == on).all())  # background and distractors last
    top = scores.argsort(descending=True, stable=True)[:len(sample.objects)].tolist()
    for obj in sample.objects:  # each object's nearest-to-centre patch made the cut
        want = _nearest_patch_distance(obj)
        got = [(p % GRID * sv.PATCH + sv.PATCH / 2 - obj.cx) ** 2
               + (p // GRID * sv.PATCH + sv.PATCH / 2 - obj.cy) ** 2 for p in top]
        assert min(got) == want, (obj, want, got)
