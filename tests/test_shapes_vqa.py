"""ShapesVQA: every property checked against expectations derived from the data itself.

Answers are recomputed here from ``sample.objects`` with the rules the dataset promises
(not with the module's private helpers), and pixels are read back from the image.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from vllm_vtprune.data import shapes_vqa as sv

SIZE = 336
MID = SIZE / 2
MARGIN = 16
EXPECTED_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
}
EXPECTED_SHAPES = {"circle", "square", "triangle"}
WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
SEED = 7
N = 300

EXIST_RE = re.compile(r"^is there a (\w+) (\w+) \?$")
COLOR_RE = re.compile(r"^what color is the (\w+) \?$")
COUNT_RE = re.compile(r"^how many (\w+)s are there \?$")
POS_H_RE = re.compile(r"^is the (\w+) (\w+) on the left or the right \?$")
POS_V_RE = re.compile(r"^is the (\w+) (\w+) at the top or the bottom \?$")


@pytest.fixture(scope="module")
def samples():
    return [sv.make_sample(SEED, i) for i in range(N)]


def _extent(o):
    """Pixel extent [x0, x1) x [y0, y1) of an object of side ``size`` centred at (cx, cy)."""
    x0 = o.cx - o.size // 2
    y0 = o.cy - o.size // 2
    return x0, y0, x0 + o.size, y0 + o.size


def _pixels(img):
    return np.asarray(img)


# ---------------------------------------------------------------- determinism / format


def test_same_seed_and_index_give_identical_samples():
    for index in (0, 3, 17):
        a, b = sv.make_sample(5, index), sv.make_sample(5, index)
        assert np.array_equal(_pixels(a.image), _pixels(b.image))
        assert a.objects == b.objects
        assert a.qas == b.qas


def test_different_seeds_or_indices_differ():
    base = _pixels(sv.make_sample(5, 0).image)
    assert not np.array_equal(base, _pixels(sv.make_sample(6, 0).image))
    assert not np.array_equal(base, _pixels(sv.make_sample(5, 1).image))
    # Across seeds the whole sample set differs, not only the noise.
    objs_a = [sv.make_sample(11, i).objects for i in range(10)]
    objs_b = [sv.make_sample(12, i).objects for i in range(10)]
    assert objs_a != objs_b


def test_image_is_336_rgb(samples):
    for s in samples[:20]:
        assert s.image.mode == "RGB"
        assert s.image.size == (SIZE, SIZE)
        assert _pixels(s.image).shape == (SIZE, SIZE, 3)


# ---------------------------------------------------------------- background


def _background_mask(s):
    mask = np.ones((SIZE, SIZE), dtype=bool)
    for o in s.objects:
        x0, y0, x1, y1 = _extent(o)
        mask[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = False
    return mask


def test_background_is_textured_not_flat(samples):
    ranges = []
    for s in samples[:40]:
        px = _pixels(s.image).astype(np.float64)
        mask = _background_mask(s)
        bg = px[mask]
        assert bg.shape[0] > 0.3 * SIZE * SIZE
        # Per-pixel noise: every channel varies a lot over the background.
        assert (bg.std(axis=0) > 6).all(), bg.std(axis=0)
        # Neighbouring background pixels differ (noise, not flat paint).
        both = mask[:, 1:] & mask[:, :-1]
        dx = np.abs(px[:, 1:] - px[:, :-1])[both]
        assert dx.mean() > 3
        # Smooth gradient: 21x21 block means of the background (noise averages out).
        block = 21
        means = []
        for by in range(0, SIZE, block):
            for bx in range(0, SIZE, block):
                m = mask[by:by + block, bx:bx + block]
                if m.sum() > 0.8 * block * block:
                    means.append(px[by:by + block, bx:bx + block][m].mean(axis=0))
        means = np.array(means)
        ranges.append((means.max(axis=0) - means.min(axis=0)).max())
    # Most images carry a visible large-scale gradient (max channel swing of block means).
    ranges = np.array(ranges)
    assert np.median(ranges) > 10, ranges
    assert (ranges > 4).mean() > 0.8, ranges


# ---------------------------------------------------------------- objects


def test_object_count_sizes_inside_and_disjoint(samples):
    counts = Counter()
    for s in samples:
        objs = s.objects
        assert 1 <= len(objs) <= 6
        counts[len(objs)] += 1
        for o in objs:
            assert 20 <= o.size <= 100
            x0, y0, x1, y1 = _extent(o)
            assert 0 <= x0 and x1 <= SIZE and 0 <= y0 and y1 <= SIZE, o
            assert o.shape in EXPECTED_SHAPES and o.color in EXPECTED_COLORS
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                ax0, ay0, ax1, ay1 = _extent(objs[i])
                bx0, by0, bx1, by1 = _extent(objs[j])
                disjoint = ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
                assert disjoint, (objs[i], objs[j])
    # The whole range 1..6 occurs.
    assert set(counts) == set(range(1, 7)), counts


def test_all_shapes_and_colors_occur(samples):
    shapes = {o.shape for s in samples for o in s.objects}
    colors = {o.color for s in samples for o in s.objects}
    assert shapes == EXPECTED_SHAPES
    assert colors == set(EXPECTED_COLORS)
    combos = {(o.color, o.shape) for s in samples for o in s.objects}
    assert len(combos) == 18


def test_sizes_span_small_and_large(samples):
    sizes = [o.size for s in samples for o in s.objects]
    assert min(sizes) < 30 and max(sizes) > 85


def test_drawn_pixels_show_the_object(samples):
    for s in samples[:150]:
        px = _pixels(s.image)
        for o in s.objects:
            if o.shape == "triangle":
                x, y = o.cx, o.cy + o.size // 6
            else:
                x, y = o.cx, o.cy
            assert tuple(int(v) for v in px[y, x]) == EXPECTED_COLORS[o.color], o
        # Far corners of every object's box are background for circles and triangles
        # (the shape does not fill its box), whereas a square does fill it.
        for o in s.objects:
            x0, y0, x1, y1 = _extent(o)
            corner = tuple(int(v) for v in px[y0 + 1, x0 + 1])
            if o.shape == "square":
                assert corner == EXPECTED_COLORS[o.color], o
            else:
                assert corner != EXPECTED_COLORS[o.color], o


# ---------------------------------------------------------------- questions


def _expected_answer(qa, objs):
    pairs = [(o.color, o.shape) for o in objs]
    if qa.qtype == "exist":
        m = EXIST_RE.match(qa.question)
        assert m, qa
        return "yes" if (m.group(1), m.group(2)) in pairs else "no"
    if qa.qtype == "color":
        m = COLOR_RE.match(qa.question)
        assert m, qa
        matching = [o for o in objs if o.shape == m.group(1)]
        assert len(matching) == 1, (qa, objs)
        return matching[0].color
    if qa.qtype == "count":
        m = COUNT_RE.match(qa.question)
        assert m, qa
        assert m.group(1) in EXPECTED_SHAPES
        return WORDS[sum(1 for o in objs if o.shape == m.group(1))]
    if qa.qtype == "position":
        mh, mv = POS_H_RE.match(qa.question), POS_V_RE.match(qa.question)
        m = mh or mv
        assert m, qa
        key = (m.group(1), m.group(2))
        matching = [o for o in objs if (o.color, o.shape) == key]
        assert len(matching) == 1, (qa, objs)
        o = matching[0]
        if mh:
            assert abs(o.cx - MID) >= MARGIN, (qa, o)
            return "left" if o.cx < MID else "right"
        assert abs(o.cy - MID) >= MARGIN, (qa, o)
        return "top" if o.cy < MID else "bottom"
    raise AssertionError(f"unknown question type {qa.qtype!r}")


def test_every_answer_recomputed_from_objects(samples):
    for s in samples:
        for qa in s.qas:
            assert qa.answer == _expected_answer(qa, s.objects), (qa, s.objects)


def test_missing_question_types_were_impossible(samples):
    for s in samples:
        kinds = {qa.qtype for qa in s.qas}
        # exist and count can always be asked.
        assert {"exist", "count"} <= kinds
        shape_counts = Counter(o.shape for o in s.objects)
        if "color" not in kinds:
            assert 1 not in shape_counts.values(), s.objects
        if "position" not in kinds:
            pair_counts = Counter((o.color, o.shape) for o in s.objects)
            askable = [o for o in s.objects if pair_counts[(o.color, o.shape)] == 1
                       and (abs(o.cx - MID) >= MARGIN or abs(o.cy - MID) >= MARGIN)]
            assert not askable, s.objects


def test_four_question_types_present(samples):
    types = Counter(qa.qtype for s in samples for qa in s.qas)
    assert set(types) == {"exist", "color", "count", "position"}
    # Each type is common, not a rarity.
    for t in ("color", "position"):
        assert types[t] > 0.3 * N, types


def test_all_position_answers_and_counts_occur(samples):
    answers = Counter(qa.answer for s in samples for qa in s.qas if qa.qtype == "position")
    assert set(answers) == {"left", "right", "top", "bottom"}
    counts = {qa.answer for s in samples for qa in s.qas if qa.qtype == "count"}
    assert {"zero", "one", "two"} <= counts


def test_exist_questions_balanced_and_adversarial(samples):
    yes = no = adversarial = 0
    for s in samples:
        for qa in s.qas:
            if qa.qtype != "exist":
                continue
            color, shape = EXIST_RE.match(qa.question).groups()
            pairs = {(o.color, o.shape) for o in s.objects}
            if (color, shape) in pairs:
                yes += 1
                continue
            no += 1
            if color in {c for c, _ in pairs} and shape in {sh for _, sh in pairs}:
                adversarial += 1
    total = yes + no
    assert total >= N
    assert 0.4 <= yes / total <= 0.6, (yes, no)
    assert adversarial / no > 0.2, (adversarial, no)


# ---------------------------------------------------------------- iter_questions


def _find_index(seed, image, start):
    target = _pixels(image)
    for j in range(start, start + 50):
        if np.array_equal(_pixels(sv.make_sample(seed, j).image), target):
            return j
    raise AssertionError("yielded image is none of the next 50 samples")


@pytest.mark.parametrize("start", [0, 9])
def test_iter_questions_equal_turns_and_fresh_images(start):
    seed, num = 3, 12
    pairs = list(sv.iter_questions(seed, num, start=start))
    assert len(pairs) == num
    order = ["exist", "color", "count", "position"]
    prev = start - 1
    for i, (image, qa) in enumerate(pairs):
        assert qa.qtype == order[i % 4]
        j = _find_index(seed, image, prev + 1)
        # Strictly increasing source index: no image used twice.
        assert j > prev
        sample = sv.make_sample(seed, j)
        assert qa in sample.qas
        # Skipped images could not ask this turn's type.
        for k in range(prev + 1, j):
            assert order[i % 4] not in {q.qtype for q in sv.make_sample(seed, k).qas}
        prev = j
    # The first image is the first sample of the range that has the type.
    assert _find_index(seed, pairs[0][0], start) == start


# ---------------------------------------------------------------- the hard split

HARD_N = 300
HARD_WORDS = WORDS + ["seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen",
                      "fourteen", "fifteen", "sixteen"]
RELATION_RE = re.compile(r"^what color is the (\w+) (left of|right of|above|below) "
                         r"the (\w+) (\w+) \?$")
COMPARE_RE = re.compile(r"^is the (\w+) (\w+) (left of|right of|above|below) "
                        r"the (\w+) (\w+) \?$")
# (axis, sign): the named object lies on this side of the reference.
SIDES = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}


@pytest.fixture(scope="module")
def hard():
    return [sv.make_sample(SEED, i, split="hard") for i in range(HARD_N)]


def _only(objs, color, shape):
    matching = [o for o in objs if (o.color, o.shape) == (color, shape)]
    assert len(matching) == 1, (color, shape, objs)
    return matching[0]


def _along(o, ref, axis):
    return o.cx - ref.cx if axis == "x" else o.cy - ref.cy


def _hard_answer(qa, objs):
    if qa.qtype == "count":
        shape = COUNT_RE.match(qa.question).group(1)
        return HARD_WORDS[sum(o.shape == shape for o in objs)]
    if qa.qtype == "relation":
        shape, word, color, ref_shape = RELATION_RE.match(qa.question).groups()
        ref = _only(objs, color, ref_shape)
        axis, sign = SIDES[word]
        others = [o for o in objs if o is not ref and o.shape == shape]
        # no candidate straddles the reference's centre line: "left of" is unambiguous
        assert all(abs(_along(o, ref, axis)) >= MARGIN for o in others), (qa, objs)
        named = [o for o in others if _along(o, ref, axis) * sign > 0]
        assert len(named) == 1, (qa, objs)
        return named[0].color
    if qa.qtype == "compare":
        c1, s1, word, c2, s2 = COMPARE_RE.match(qa.question).groups()
        a, b = _only(objs, c1, s1), _only(objs, c2, s2)
        axis, sign = SIDES[word]
        assert abs(_along(a, b, axis)) >= MARGIN, (qa, objs)
        return "yes" if _along(a, b, axis) * sign > 0 else "no"
    return _expected_answer(qa, objs)


def test_hard_split_is_deterministic_and_unlike_the_standard():
    a, b = sv.make_sample(5, 3, split="hard"), sv.make_sample(5, 3, split="hard")
    assert np.array_equal(_pixels(a.image), _pixels(b.image))
    assert (a.objects, a.distractors, a.qas) == (b.objects, b.distractors, b.qas)
    assert not np.array_equal(_pixels(a.image), _pixels(sv.make_sample(5, 3).image))
    with pytest.raises(ValueError, match="hard"):
        sv.make_sample(5, 3, split="harder")


def test_hard_objects_many_small_and_disjoint_from_distractors(hard):
    counts = Counter(len(s.objects) for s in hard)
    assert min(counts) == 1 and max(counts) == 16, counts
    assert sum(n for k, n in counts.items() if k >= 10) > 0.3 * HARD_N
    sizes = [o.size for s in hard for o in s.objects]
    assert min(sizes) <= 14 and max(sizes) <= 64
    assert sum(sz < 20 for sz in sizes) > 0.15 * len(sizes)  # a patch or so
    with_distractors = 0
    for s in hard:
        everything = s.objects + s.distractors
        for i, a in enumerate(everything):
            x0, y0, x1, y1 = _extent(a)
            assert 0 <= x0 and x1 <= SIZE and 0 <= y0 and y1 <= SIZE, a
            for b in everything[i + 1:]:
                bx0, by0, bx1, by1 = _extent(b)
                assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0, (a, b)
        # distractors wear the objects' colours and are never a questioned shape
        assert {d.color for d in s.distractors} <= {o.color for o in s.objects}
        assert {d.shape for d in s.distractors} <= {"ring", "bar"}
        with_distractors += bool(s.distractors)
    assert with_distractors > 0.7 * HARD_N


def test_hard_distractor_pixels(hard):
    """A ring is hollow (background at its centre, its colour on its rim); a bar is
    flat (its colour at its centre, background above its top edge)."""
    seen = Counter()
    for s in hard[:120]:
        px = _pixels(s.image)
        for d in s.distractors:
            colour = EXPECTED_COLORS[d.color]
            x0, y0, x1, y1 = _extent(d)
            if d.shape == "ring":
                assert tuple(int(v) for v in px[d.cy, d.cx]) != colour, d
                assert tuple(int(v) for v in px[d.cy, x0 + 1]) == colour, d
            else:
                assert tuple(int(v) for v in px[d.cy, d.cx]) == colour, d
                assert tuple(int(v) for v in px[y0, d.cx]) != colour, d
            seen[d.shape] += 1
    assert seen["ring"] > 20 and seen["bar"] > 20, seen


def test_hard_answers_recomputed_from_objects(hard):
    types = Counter()
    for s in hard:
        for qa in s.qas:
            assert qa.answer == _hard_answer(qa, s.objects), (qa, s.objects)
            types[qa.qtype] += 1
    assert set(types) == {"exist", "color", "count", "position", "relation", "compare"}
    for t in ("relation", "compare", "color"):
        assert types[t] > 0.3 * HARD_N, types


def test_hard_answer_spread(hard):
    answers = {t: Counter(qa.answer for s in hard for qa in s.qas if qa.qtype == t)
               for t in ("relation", "compare", "count")}
    assert set(answers["relation"]) == set(EXPECTED_COLORS)
    yes, no = answers["compare"]["yes"], answers["compare"]["no"]
    assert 0.4 <= yes / (yes + no) <= 0.6, answers["compare"]
    assert set(answers["count"]) - set(WORDS), answers["count"]  # counts beyond six
    words = {m.group(2) for s in hard for qa in s.qas if qa.qtype == "relation"
             for m in [RELATION_RE.match(qa.question)]}
    assert words == set(SIDES)


def test_hard_missing_two_object_types_were_impossible(hard):
    for s in hard:
        kinds = {qa.qtype for qa in s.qas}
        pair_counts = Counter((o.color, o.shape) for o in s.objects)
        unique = [o for o in s.objects if pair_counts[(o.color, o.shape)] == 1]
        if "compare" not in kinds:
            assert not any(abs(_along(a, b, ax)) >= MARGIN for a in unique for b in unique
                           if a is not b for ax in ("x", "y")), s.objects
        if "relation" not in kinds:
            for ref in unique:
                for word, (axis, sign) in SIDES.items():
                    for shape in EXPECTED_SHAPES:
                        others = [o for o in s.objects if o is not ref and o.shape == shape]
                        if any(abs(_along(o, ref, axis)) < MARGIN for o in others):
                            continue
                        named = [o for o in others if _along(o, ref, axis) * sign > 0]
                        assert len(named) != 1, (ref, word, shape, s.objects)


def test_hard_iter_questions_takes_turns_over_six_types():
    pairs = list(sv.iter_questions(SEED, 12, start=40, split="hard"))
    order = ["exist", "color", "count", "position", "relation", "compare"]
    assert [qa.qtype for _, qa in pairs] == order * 2


def _patches_by_pixels(objects) -> np.ndarray:
    """Slow reference: paint every pixel of every box, then mark a 14x14 patch hit when
    any of its pixels is painted."""
    painted = np.zeros((SIZE, SIZE), dtype=bool)
    for o in objects:
        x0, y0, x1, y1 = o.box
        painted[max(y0, 0):min(y1, SIZE), max(x0, 0):min(x1, SIZE)] = True
    return painted.reshape(SIZE // 14, 14, SIZE // 14, 14).any(axis=(1, 3)).reshape(-1)


@pytest.mark.parametrize("objects", [
    [],
    [sv.Obj("square", "red", 35, 37, 30)],  # box (20, 22, 50, 52): patches x 1-3, y 1-3
    [sv.Obj("circle", "blue", 21, 21, 14)],  # box (14, 14, 28, 28): exactly patch (1, 1)
    [sv.Obj("triangle", "green", 330, 5, 20), sv.Obj("circle", "red", 168, 168, 12)],
])
def test_object_patches_are_the_patches_the_boxes_overlap(objects):
    got = sv.object_patches(objects)
    assert got.shape == (576,) and got.dtype == bool
    assert np.array_equal(got, _patches_by_pixels(objects))
    if objects and objects[0].size == 14:
        assert np.flatnonzero(got).tolist() == [1 * 24 + 1]


def test_object_patches_of_generated_samples_match_their_pixels():
    split = sv.split_of("hard")
    for index in range(5):
        s = sv.make_sample(split.heldout_seed, index, split=split)
        everything = s.objects + s.distractors
        assert np.array_equal(sv.object_patches(everything), _patches_by_pixels(everything))
