"""Does a ShapesVQA LLaVA compare two objects, or answer the hard split's two-object
questions some other way? (transformers reference path, all 576 tokens)

    python bench/two_object_probe.py --model vllm_vtprune/embedded/shapes-llava-v2 --num 600

Over the first ``--num`` held-out hard questions from ``--start`` (the benchmarks'
first, ``shapes_vqa.BENCH_START``, by default), prints

* ``compare``: accuracy as asked and with the relation word turned to its opposite
  (``left of`` <-> ``right of``, ``above`` <-> ``below``; the right answer flips), and the
  share of questions whose answer the model flips with the word. A model that reads both
  objects' places flips every answer; one that ignores them flips none and sits at 1/2.
* ``relation``: accuracy where every candidate (each object of the asked shape but the
  reference) has one colour, so the answer needs no comparison, and where the candidates
  differ in colour, so it does.
* ``coordinates``: how well a linear map of the projector output at an object's centre
  patch gives that object's centre (R^2 on a held-out 30 % of the objects of ``--images``
  images, and how often it orders two objects at least ``MIDLINE_MARGIN`` apart as they
  lie): whether the LLM is handed the places it would compare.
"""
from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import torch

from vllm_vtprune.data import shapes_vqa as sv

# Each relation word and the one on its axis with the other sign.
OPPOSITE = {word: other for word, (axis, sign) in sv.RELATIONS.items()
            for other, (other_axis, other_sign) in sv.RELATIONS.items()
            if other_axis == axis and other_sign == -sign}


def flipped(qa: sv.QA) -> sv.QA:
    """A compare question with its relation word turned to the opposite, answer flipped
    (exact: the generator keeps the two centres ``MIDLINE_MARGIN`` apart on that axis)."""
    for word, other in OPPOSITE.items():
        if f" {word} " in qa.question:
            return sv.QA(qa.qtype, qa.question.replace(f" {word} ", f" {other} "),
                         "no" if qa.answer == "yes" else "yes")
    raise ValueError(f"not a compare question: {qa.question!r}")


def relation_candidates(sample: sv.Sample, qa: sv.QA) -> list[sv.Obj]:
    """The objects a relation question's target is chosen among: every object of the asked
    shape except the reference ("what color is the SHAPE WORD the COLOUR SHAPE ?")."""
    words = qa.question.split()
    shape, ref = words[4], (words[-3], words[-2])
    return [o for o in sample.objects if o.shape == shape and (o.color, o.shape) != ref]


def needs_comparison(sample: sv.Sample, qa: sv.QA) -> bool:
    """Whether a relation question's answer depends on where the objects lie: its
    candidates come in more than one colour."""
    return len({o.color for o in relation_candidates(sample, qa)}) > 1


def linear_fit_r2(x: np.ndarray, y: np.ndarray, train: float = 0.7) -> tuple[np.ndarray, ...]:
    """Least-squares affine map fitted on the first ``train`` share of rows; returns the
    R^2 of each target column and the predictions on the remaining rows."""
    n = int(len(x) * train)
    a = np.c_[x, np.ones(len(x))]
    w, *_ = np.linalg.lstsq(a[:n], y[:n], rcond=None)
    pred = a[n:] @ w
    r2 = 1 - ((pred - y[n:]) ** 2).mean(0) / y[n:].var(0)
    return r2, pred


def pair_order_accuracy(pred: np.ndarray, true: np.ndarray, margin: float) -> float:
    """Share of pairs at least ``margin`` apart in ``true`` whose order ``pred`` keeps."""
    i, j = np.triu_indices(len(true), 1)
    far = np.abs(true[i] - true[j]) >= margin
    return float(((pred[i] > pred[j]) == (true[i] > true[j]))[far].mean())


def _yes_margin(model, tok, questions: list[str], feats: list[torch.Tensor]) -> torch.Tensor:
    from vllm_vtprune.embedded import evaluate as ev

    logits = ev.next_token_logits(model, tok, questions, feats)
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    return logits[:, yes] - logits[:, no]


@torch.no_grad()
def question_probe(model, tok, rows, batch: int = 16) -> dict:
    from vllm_vtprune.embedded import evaluate as ev
    from vllm_vtprune.embedded.conversation import pixel_values

    hits = collections.defaultdict(list)
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        feats = list(ev.image_features(model, pixel_values([s.image for s, _ in chunk])))
        compare = [i for i, (_, qa) in enumerate(chunk) if qa.qtype == "compare"]
        if compare:
            qs = [chunk[i][1] for i in compare]
            f = [feats[i] for i in compare]
            asked = _yes_margin(model, tok, [q.question for q in qs], f) > 0
            turned = _yes_margin(model, tok, [flipped(q).question for q in qs], f) > 0
            for q, a, t in zip(qs, asked.tolist(), turned.tolist()):
                hits["compare_asked"].append(a == (q.answer == "yes"))
                hits["compare_word_turned"].append(t == (q.answer == "no"))
                hits["compare_answer_flips_with_word"].append(a != t)
        relation = [i for i, (_, qa) in enumerate(chunk) if qa.qtype == "relation"]
        if relation:
            logits = ev.next_token_logits(model, tok, [chunk[i][1].question for i in relation],
                                          [feats[i] for i in relation])
            preds = tok.batch_decode(logits.argmax(-1)[:, None])
            for i, pred in zip(relation, preds):
                sample, qa = chunk[i]
                key = "needs_comparison" if needs_comparison(sample, qa) else "one_colour"
                hits[f"relation_{key}"].append(pred.strip() == qa.answer)
    return {k: {"accuracy": round(sum(v) / len(v), 4), "num": len(v)} for k, v in hits.items()}


@torch.no_grad()
def coordinate_probe(model, images: int, seed: int, start: int) -> dict:
    from vllm_vtprune.embedded import evaluate as ev
    from vllm_vtprune.embedded.conversation import pixel_values

    grid = sv.IMAGE_SIZE // sv.PATCH
    x, y = [], []
    for first in range(start, start + images, 16):
        samples = [sv.make_sample(seed, i, split="hard")
                   for i in range(first, min(first + 16, start + images))]
        feats = ev.image_features(model, pixel_values([s.image for s in samples]))
        for s, f in zip(samples, feats):
            for o in s.objects:
                x.append(f[(o.cy // sv.PATCH) * grid + o.cx // sv.PATCH].float().numpy())
                y.append([o.cx, o.cy])
    r2, pred = linear_fit_r2(np.array(x), np.array(y, dtype=np.float64))
    held = np.array(y, dtype=np.float64)[-len(pred):]
    return {"objects": len(y), "r2_x": round(float(r2[0]), 4), "r2_y": round(float(r2[1]), 4),
            "pair_order_x": round(pair_order_accuracy(pred[:, 0], held[:, 0],
                                                      sv.MIDLINE_MARGIN), 4)}


def main() -> None:
    from vllm_vtprune.embedded import evaluate as ev
    from vllm_vtprune.embedded import model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--num", type=int, default=600, help="held-out hard questions")
    p.add_argument("--start", type=int, default=sv.BENCH_START,
                   help="first held-out image (default: the benchmarks' first)")
    p.add_argument("--images", type=int, default=300, help="images for the coordinate probe")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = ev.load_model(args.model or model_path())
    hard = sv.split_of("hard")
    rows = list(sv.iter_sample_questions(hard.heldout_seed, args.num, args.start, hard))
    out = {"model": args.model or model_path(), "num": args.num, "start": args.start,
           **question_probe(model, tok, rows),
           "coordinates": coordinate_probe(model, args.images, hard.heldout_seed,
                                           args.start + 10 * args.num)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
