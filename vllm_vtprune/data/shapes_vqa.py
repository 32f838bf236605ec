"""ShapesVQA: procedural visual question answering whose answers hinge on a few patches.

Every sample is a deterministic function of ``(seed, index)``: a 336x336 RGB image on a
textured background (a two-colour gradient plus Gaussian noise) holding 1 to 6
non-overlapping shapes, 20 to 100 px across, and questions of four types with one-word
answers:

* ``exist``    -- "is there a red circle ?" yes/no, balanced; half of the negatives are
  adversarial in the POPE sense: they name a colour and a shape that are both present in
  the image, but never together.
* ``color``    -- "what color is the triangle ?" for a shape present exactly once.
* ``count``    -- "how many squares are there ?" zero to six.
* ``position`` -- "is the blue circle on the left or the right ?" (or top/bottom) for an
  object whose (colour, shape) is unique and whose centre is clearly off the midline.

A 20 px object covers fewer than 2x2 of the 14 px CLIP patches, so a pruning method that
drops the wrong tokens loses the answer.

Two splits share the generator (:data:`SPLITS`). ``standard`` is the above. ``hard``
holds 1 to 16 objects down to 12 px (under one patch), up to 6 distractors (hollow
rings and flat bars, never named by a question) painted in the colours of the objects,
and two more question types that need two objects:

* ``relation`` -- "what color is the square left of the red circle ?" (or right of,
  above, below) where the red circle is unique, exactly one square lies on that side of
  it and no square lies within the margin of its centre line.
* ``compare``  -- "is the red circle above the blue square ?" yes/no, both unique, their
  centres at least the margin apart along the asked axis.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH = 14
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
# Counts of the hard split, which holds up to 16 objects.
MORE_NUMBERS = ("seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen",
                "fifteen", "sixteen")
COUNT_WORDS = NUMBERS + MORE_NUMBERS
QUESTION_TYPES = ("exist", "color", "count", "position")
TWO_OBJECT_TYPES = ("relation", "compare")
MIN_SIZE, MAX_SIZE = 20, 100
# Position questions skip objects whose centre lies this close to the midline; relation
# and compare questions skip pairs this close along the asked axis.
MIDLINE_MARGIN = 16
DISTRACTOR_SHAPES = ("ring", "bar")
# Relation words and the axis (0: x, 1: y) and sign they test against the reference.
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}


@dataclasses.dataclass(frozen=True)
class Split:
    """What one split's images hold and which questions it asks."""

    name: str
    max_objects: int
    min_size: int
    max_size: int
    max_distractors: int
    question_types: tuple[str, ...]
    train_seed: int
    heldout_seed: int


STANDARD = Split("standard", 6, MIN_SIZE, MAX_SIZE, 0, QUESTION_TYPES, 1, 2)
HARD = Split("hard", 16, 12, 64, 6, QUESTION_TYPES + TWO_OBJECT_TYPES, 3, 4)
SPLITS = {s.name: s for s in (STANDARD, HARD)}


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: int
    cy: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        h = self.size // 2
        return (self.cx - h, self.cy - h, self.cx - h + self.size, self.cy - h + self.size)


@dataclasses.dataclass(frozen=True)
class QA:
    qtype: str
    question: str
    answer: str


@dataclasses.dataclass
class Sample:
    image: Image.Image
    objects: list[Obj]
    qas: list[QA]
    distractors: list[Obj] = dataclasses.field(default_factory=list)


def object_patches(objects) -> np.ndarray:
    """[(IMAGE_SIZE // PATCH) ** 2] bool, row-major: the 14x14 patches any of
    ``objects``' boxes overlaps (pass ``sample.objects + sample.distractors`` for every
    shape drawn)."""
    grid = IMAGE_SIZE // PATCH
    hit = np.zeros((grid, grid), dtype=bool)
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        hit[max(y0, 0) // PATCH:min(y1 - 1, IMAGE_SIZE - 1) // PATCH + 1,
            max(x0, 0) // PATCH:min(x1 - 1, IMAGE_SIZE - 1) // PATCH + 1] = True
    return hit.reshape(-1)


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


def _background(rng: random.Random) -> np.ndarray:
    """Muted two-colour gradient at a random angle plus per-pixel Gaussian noise."""
    c0 = np.array([rng.randint(70, 190) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(70, 190) for _ in range(3)], dtype=np.float32)
    # Pull both ends towards grey so that no background reads as a saturated object colour.
    c0 = 0.5 * c0 + 0.5 * c0.mean()
    c1 = 0.5 * c1 + 0.5 * c1.mean()
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / (IMAGE_SIZE - 1)
    t = (np.cos(angle) * xs + np.sin(angle) * ys)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _overlaps(a: Obj, b: Obj, gap: int = 4) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return not (ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0)


def _place_objects(rng: random.Random, split: Split = STANDARD) -> list[Obj]:
    target = rng.randint(1, split.max_objects)
    objs: list[Obj] = []
    for _ in range(400):
        if len(objs) == target:
            break
        # Sizes are drawn log-uniformly so that small, few-patch objects are common.
        o = _random_obj(rng, split.min_size, split.max_size, SHAPES, list(COLORS))
        if not any(_overlaps(o, p) for p in objs):
            objs.append(o)
    return objs


def _random_obj(rng: random.Random, min_size: int, max_size: int, shapes, colors) -> Obj:
    size = int(round(np.exp(rng.uniform(np.log(min_size), np.log(max_size)))))
    h = size // 2
    return Obj(rng.choice(shapes), rng.choice(colors),
               rng.randint(h + 2, IMAGE_SIZE - size + h - 2),
               rng.randint(h + 2, IMAGE_SIZE - size + h - 2), size)


def _place_distractors(rng: random.Random, split: Split, objs: list[Obj]) -> list[Obj]:
    """Rings and bars in the colours the objects use, clear of every object."""
    if not split.max_distractors:
        return []
    target = rng.randint(0, split.max_distractors)
    colors = sorted({o.color for o in objs})
    out: list[Obj] = []
    for _ in range(200):
        if len(out) == target:
            break
        o = _random_obj(rng, max(split.min_size, 14), 40, DISTRACTOR_SHAPES, colors)
        if not any(_overlaps(o, p) for p in objs + out):
            out.append(o)
    return out


def ring_width(size: int) -> int:
    return max(2, size // 5)


def bar_height(size: int) -> int:
    return max(4, size // 3)


def draw_shape(d: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    x0, y0, x1, y1 = o.box
    if o.shape == "circle":
        d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif o.shape == "square":
        d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif o.shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    elif o.shape == "ring":
        d.ellipse((x0, y0, x1 - 1, y1 - 1), outline=fill, width=ring_width(o.size))
    else:  # a horizontal bar through the box's centre
        top = o.cy - bar_height(o.size) // 2
        d.rectangle((x0, top, x1 - 1, top + bar_height(o.size) - 1), fill=fill)


def _draw(bg: np.ndarray, objs: list[Obj]) -> Image.Image:
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    for o in objs:
        draw_shape(d, o, COLORS[o.color])
    return img


def _plural(shape: str) -> str:
    return shape + "s"


def _exist_question(rng: random.Random, objs: list[Obj]) -> QA:
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        colors = {c for c, _ in present}
        shapes = {s for _, s in present}
        adversarial = [(c, s) for c in sorted(colors) for s in sorted(shapes)
                       if (c, s) not in present]
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        pool = adversarial if adversarial and rng.random() < 0.5 else absent
        color, shape = rng.choice(pool)
        answer = "no"
    return QA("exist", f"is there a {color} {shape} ?", answer)


def _color_question(rng: random.Random, objs: list[Obj]) -> QA | None:
    unique = [s for s in SHAPES if sum(o.shape == s for o in objs) == 1]
    if not unique:
        return None
    shape = rng.choice(unique)
    color = next(o.color for o in objs if o.shape == shape)
    return QA("color", f"what color is the {shape} ?", color)


def _count_question(rng: random.Random, objs: list[Obj]) -> QA:
    shape = rng.choice(SHAPES)
    n = sum(o.shape == shape for o in objs)
    return QA("count", f"how many {_plural(shape)} are there ?", COUNT_WORDS[n])


def _position_question(rng: random.Random, objs: list[Obj]) -> QA | None:
    counts: dict[tuple[str, str], int] = {}
    for o in objs:
        counts[(o.color, o.shape)] = counts.get((o.color, o.shape), 0) + 1
    mid = IMAGE_SIZE / 2
    options = []
    for o in objs:
        if counts[(o.color, o.shape)] != 1:
            continue
        if abs(o.cx - mid) >= MIDLINE_MARGIN:
            options.append((o, "horizontal"))
        if abs(o.cy - mid) >= MIDLINE_MARGIN:
            options.append((o, "vertical"))
    if not options:
        return None
    o, axis = rng.choice(options)
    if axis == "horizontal":
        return QA("position", f"is the {o.color} {o.shape} on the left or the right ?",
                  "left" if o.cx < mid else "right")
    return QA("position", f"is the {o.color} {o.shape} at the top or the bottom ?",
              "top" if o.cy < mid else "bottom")


def _unique(objs: list[Obj]) -> list[Obj]:
    """The objects no other object shares colour and shape with, in placement order."""
    counts: dict[tuple[str, str], int] = {}
    for o in objs:
        counts[(o.color, o.shape)] = counts.get((o.color, o.shape), 0) + 1
    return [o for o in objs if counts[(o.color, o.shape)] == 1]


def _offset(o: Obj, ref: Obj, axis: int) -> int:
    return (o.cx - ref.cx) if axis == 0 else (o.cy - ref.cy)


def _relation_question(rng: random.Random, objs: list[Obj]) -> QA | None:
    options = []
    for ref in _unique(objs):
        for word, (axis, sign) in RELATIONS.items():
            for shape in SHAPES:
                others = [o for o in objs if o is not ref and o.shape == shape]
                offsets = [_offset(o, ref, axis) for o in others]
                if any(abs(d) < MIDLINE_MARGIN for d in offsets):
                    continue
                side = [o for o, d in zip(others, offsets) if d * sign > 0]
                if len(side) == 1:
                    options.append((ref, word, shape, side[0]))
    if not options:
        return None
    ref, word, shape, target = rng.choice(options)
    return QA("relation", f"what color is the {shape} {word} the {ref.color} {ref.shape} ?",
              target.color)


def _compare_question(rng: random.Random, objs: list[Obj]) -> QA | None:
    unique = _unique(objs)
    options = [(a, b, axis) for a in unique for b in unique if a is not b
               for axis in (0, 1) if abs(_offset(a, b, axis)) >= MIDLINE_MARGIN]
    if not options:
        return None
    a, b, axis = rng.choice(options)
    word = rng.choice([w for w, (ax, _) in RELATIONS.items() if ax == axis])
    sign = RELATIONS[word][1]
    answer = "yes" if _offset(a, b, axis) * sign > 0 else "no"
    return QA("compare", f"is the {a.color} {a.shape} {word} the {b.color} {b.shape} ?", answer)


_MAKERS = {
    "exist": _exist_question,
    "color": _color_question,
    "count": _count_question,
    "position": _position_question,
    "relation": _relation_question,
    "compare": _compare_question,
}


def split_of(name: str | Split) -> Split:
    if isinstance(name, Split):
        return name
    if name not in SPLITS:
        raise ValueError(f"unknown ShapesVQA split {name!r}; accepted: {', '.join(SPLITS)}")
    return SPLITS[name]


def make_sample(seed: int, index: int, questions_per_type: int = 1,
                split: str | Split = "standard") -> Sample:
    """Render sample ``index`` of ``split`` under ``seed``; pure in its arguments."""
    split = split_of(split)
    rng = _rng(seed, index)
    objs = _place_objects(rng, split)
    distractors = _place_distractors(rng, split, objs)
    image = _draw(_background(rng), objs + distractors)
    qas: list[QA] = []
    for qtype in split.question_types:
        for _ in range(questions_per_type):
            qa = _MAKERS[qtype](rng, objs)
            if qa is not None and qa not in qas:
                qas.append(qa)
    return Sample(image, objs, qas, distractors)


def iter_questions(seed: int, num: int, start: int = 0,
                   split: str | Split = "standard") -> Iterator[tuple[Image.Image, QA]]:
    """Yield ``num`` (image, question) pairs with the split's types in equal turns.

    Question ``i`` has type ``types[i % len(types)]``; images that cannot ask that type
    (no uniquely present shape, say) are skipped, so every image is used at most once.
    """
    for sample, qa in iter_sample_questions(seed, num, start, split):
        yield sample.image, qa


def iter_sample_questions(seed: int, num: int, start: int = 0,
                          split: str | Split = "standard") -> Iterator[tuple[Sample, QA]]:
    """:func:`iter_questions` with each question's whole sample (its objects too)."""
    types = split_of(split).question_types
    index = start
    for i in range(num):
        want = types[i % len(types)]
        while True:
            sample = make_sample(seed, index, split=split)
            index += 1
            qa = next((q for q in sample.qas if q.qtype == want), None)
            if qa is not None:
                yield sample, qa
                break


# The first held-out image the benchmarks ask about (bench/accuracy.py and the diagnoses):
# images below it are left to quick checks, so a bench run and a check share no image.
BENCH_START = 20_000

# The standard split's seeds: training never sees the held-out images.
TRAIN_SEED = STANDARD.train_seed
HELDOUT_SEED = STANDARD.heldout_seed
