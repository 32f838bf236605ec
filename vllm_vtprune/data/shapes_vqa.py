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
QUESTION_TYPES = ("exist", "color", "count", "position")
MIN_SIZE, MAX_SIZE = 20, 100
# Position questions skip objects whose centre lies this close to the midline.
MIDLINE_MARGIN = 16


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


def _place_objects(rng: random.Random) -> list[Obj]:
    target = rng.randint(1, 6)
    objs: list[Obj] = []
    for _ in range(400):
        if len(objs) == target:
            break
        # Sizes are drawn log-uniformly so that small, few-patch objects are common.
        size = int(round(np.exp(rng.uniform(np.log(MIN_SIZE), np.log(MAX_SIZE)))))
        h = size // 2
        o = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)),
                rng.randint(h + 2, IMAGE_SIZE - size + h - 2),
                rng.randint(h + 2, IMAGE_SIZE - size + h - 2), size)
        if not any(_overlaps(o, p) for p in objs):
            objs.append(o)
    return objs


def draw_shape(d: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    x0, y0, x1, y1 = o.box
    if o.shape == "circle":
        d.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif o.shape == "square":
        d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


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
    return QA("count", f"how many {_plural(shape)} are there ?", NUMBERS[n])


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


_MAKERS = {
    "exist": _exist_question,
    "color": _color_question,
    "count": _count_question,
    "position": _position_question,
}


def make_sample(seed: int, index: int, questions_per_type: int = 1) -> Sample:
    """Render sample ``index`` of the split identified by ``seed``; pure in its arguments."""
    rng = _rng(seed, index)
    objs = _place_objects(rng)
    image = _draw(_background(rng), objs)
    qas: list[QA] = []
    for qtype in QUESTION_TYPES:
        for _ in range(questions_per_type):
            qa = _MAKERS[qtype](rng, objs)
            if qa is not None and qa not in qas:
                qas.append(qa)
    return Sample(image, objs, qas)


def iter_questions(seed: int, num: int, start: int = 0) -> Iterator[tuple[Image.Image, QA]]:
    """Yield ``num`` (image, question) pairs with the four types in equal turns.

    Question ``i`` has type ``QUESTION_TYPES[i % 4]``; images that cannot ask that type
    (no uniquely present shape, say) are skipped, so every image is used at most once.
    """
    index = start
    for i in range(num):
        want = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        while True:
            sample = make_sample(seed, index)
            index += 1
            qa = next((q for q in sample.qas if q.qtype == want), None)
            if qa is not None:
                yield sample.image, qa
                break


# Split seeds: training never sees the held-out images.
TRAIN_SEED = 1
HELDOUT_SEED = 2
