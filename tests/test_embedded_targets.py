"""Dense per-patch training targets of the embedded model, against geometry computed by hand."""
import numpy as np
import pytest

from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded.train import GRID, object_coverage, patch_targets


def box_overlap_share(o: sv.Obj, row: int, col: int) -> float:
    """Area of a square object's box inside patch (row, col), over the patch area."""
    x0, y0, x1, y1 = o.box
    px0, py0 = col * sv.PATCH, row * sv.PATCH
    w = max(0, min(x1, px0 + sv.PATCH) - max(x0, px0))
    h = max(0, min(y1, py0 + sv.PATCH) - max(y0, py0))
    return w * h / sv.PATCH ** 2


@pytest.mark.parametrize("cx,cy,size", [(100, 60, 20), (168, 168, 57), (53, 290, 100)])
def test_square_coverage_is_box_overlap(cx, cy, size):
    o = sv.Obj("square", "red", cx, cy, size)
    got = object_coverage([o])[0].reshape(GRID, GRID)
    want = np.array([[box_overlap_share(o, r, c) for c in range(GRID)] for r in range(GRID)])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_circle_coverage_sums_to_its_area():
    o = sv.Obj("circle", "blue", 150, 200, 80)
    area = object_coverage([o]).sum() * sv.PATCH ** 2
    assert abs(area - np.pi * 40 ** 2) / (np.pi * 40 ** 2) < 0.05


@pytest.mark.parametrize("index", range(6))
def test_targets_follow_the_object_list(index):
    objs = sv.make_sample(sv.TRAIN_SEED, index).objects
    t = patch_targets(objs)
    colours = list(sv.COLORS)
    assert t["centre"].sum() == len(objs)
    for o in objs:
        centre = (o.cy // sv.PATCH) * GRID + o.cx // sv.PATCH
        assert t["centre"][centre] == 1
        assert t["colour"][centre] == 1 + colours.index(o.color)
        assert t["shape"][centre] == 1 + sv.SHAPES.index(o.shape)
        assert tuple(t["side"][centre]) == (float(o.cx < 168), float(o.cy < 168))
    background = t["colour"] == 0
    assert (t["shape"][background] == 0).all() and (t["side"][background] == -1).all()
    # A patch labelled with an object must be touched by it.
    assert t["touched"][~background].all()


def test_empty_image_has_background_targets_only():
    t = patch_targets([])
    assert t["colour"].sum() == 0 and t["centre"].sum() == 0 and not t["touched"].any()
