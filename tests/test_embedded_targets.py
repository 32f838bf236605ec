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


def test_joint_class_numbers_colour_shape_pairs():
    import torch

    from vllm_vtprune.embedded.train import joint_class

    colours, shapes = list(sv.COLORS), list(sv.SHAPES + sv.DISTRACTOR_SHAPES)
    pairs = [(c, s) for c in colours for s in shapes]
    t = {"colour": torch.tensor([[0] + [1 + colours.index(c) for c, _ in pairs]]),
         "shape": torch.tensor([[0] + [1 + shapes.index(s) for _, s in pairs]])}
    got = joint_class(t)[0].tolist()
    assert got[0] == 0
    # Every (colour, shape) pair, distractors' included, gets its own class.
    assert sorted(got[1:]) == list(range(1, len(pairs) + 1))


def test_grid_positions_is_the_cosine_basis_of_row_and_column():
    import math

    from vllm_vtprune.embedded.train import grid_positions

    dim = 64
    table = grid_positions(dim).numpy()
    assert table.shape == (1 + GRID * GRID, dim) and not table[0].any()
    for row, col in [(0, 0), (3, 17), (11, 12), (23, 5)]:
        got = table[1 + row * GRID + col]
        for k in range(1, dim // 4 + 1):
            assert got[k - 1] == pytest.approx(math.cos(math.pi * k * (col + 0.5) / GRID), abs=1e-5)
            assert got[dim // 4 + k - 1] == pytest.approx(
                math.cos(math.pi * k * (row + 0.5) / GRID), abs=1e-5)
    # Its first column feature is positive exactly on the left half of the image.
    left = np.array([1 + r * GRID + c for r in range(GRID) for c in range(GRID // 2)])
    assert (table[left, 0] > 0).all() and (np.delete(table[1:, 0], left - 1) < 0).all()


@pytest.mark.parametrize("index", [0, 7, 19])
def test_training_questions_limit_each_type_and_answer_from_the_objects(index):
    import collections

    from vllm_vtprune.embedded.train import training_questions

    sample, qas = training_questions(index, exist_questions=6)
    per_type = collections.Counter(qa.qtype for qa in qas)
    assert per_type["exist"] <= 6 and all(per_type[t] <= 3 for t in ("color", "count", "position"))
    assert len(set(qas)) == len(qas)
    present = {(o.color, o.shape) for o in sample.objects}
    for qa in qas:
        if qa.qtype == "exist":
            _, _, _, colour, shape, _ = qa.question.split()
            assert qa.answer == ("yes" if (colour, shape) in present else "no")
    # More existence questions than the other types get, where the image allows them.
    many = [training_questions(i, 6)[1] for i in range(40)]
    assert max(sum(q.qtype == "exist" for q in qs) for qs in many) > 3


def test_type_caps_give_a_type_more_questions_and_leave_the_others():
    import collections

    from vllm_vtprune.embedded.train import _type_cap, training_questions

    base = [training_questions(i, 6, "hard")[1] for i in range(30)]
    more = [training_questions(i, 6, "hard", {"compare": 6})[1] for i in range(30)]
    count = lambda qss, t: sum(q.qtype == t for qs in qss for q in qs)  # noqa: E731
    assert all(collections.Counter(q.qtype for q in qs)["compare"] <= 6 for qs in more)
    assert count(more, "compare") > count(base, "compare")
    for t in ("exist", "color", "count", "position", "relation"):
        assert count(more, t) == count(base, t)
    assert _type_cap("compare=6") == ("compare", 6)
    with pytest.raises(Exception, match="TYPE=N"):
        _type_cap("colour=4")
