"""bench/two_object_probe.py's pure parts against the generator's geometry, re-derived here
from the objects, and its probe statistics against brute-force loops."""
from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_vtprune.data import shapes_vqa as sv

_spec = importlib.util.spec_from_file_location(
    "bench_two_object_probe", Path(__file__).resolve().parents[1] / "bench" / "two_object_probe.py")
probe = importlib.util.module_from_spec(_spec)
sys.modules["bench_two_object_probe"] = probe
_spec.loader.exec_module(probe)

HARD = sv.split_of("hard")


def _held_out(qtype: str, num: int):
    rows = sv.iter_sample_questions(HARD.heldout_seed, 6 * num, start=sv.BENCH_START,
                                  split=HARD)
    return [(s, qa) for s, qa in rows if qa.qtype == qtype][:num]


def _named(sample, colour: str, shape: str):
    (obj,) = [o for o in sample.objects if (o.color, o.shape) == (colour, shape)]
    return obj


def _is_where(a, word: str, b) -> bool:
    return {"left of": a.cx < b.cx, "right of": a.cx > b.cx,
            "above": a.cy < b.cy, "below": a.cy > b.cy}[word]


def test_a_turned_compare_question_is_answered_by_the_objects_places():
    rows = _held_out("compare", 40)
    assert len(rows) == 40
    for sample, qa in rows:
        turned = probe.flipped(qa)
        assert turned.answer != qa.answer and turned.question != qa.question
        for q in (qa, turned):
            words = q.question.rstrip(" ?").split()
            a = _named(sample, words[2], words[3])
            b = _named(sample, words[-2], words[-1])
            word = " ".join(words[4:-3])
            assert q.answer == ("yes" if _is_where(a, word, b) else "no"), q.question
    with pytest.raises(ValueError, match="not a compare question"):
        probe.flipped(sv.QA("color", "what color is the square ?", "red"))


def test_relation_questions_need_comparison_exactly_where_one_colour_would_not_do():
    rows = _held_out("relation", 40)
    kinds = set()
    for sample, qa in rows:
        words = qa.question.rstrip(" ?").split()
        shape, ref = words[4], _named(sample, words[-2], words[-1])
        others = [o for o in sample.objects if o.shape == shape and o is not ref]
        colours = {o.color for o in others}
        need = probe.needs_comparison(sample, qa)
        kinds.add(need)
        assert need == (len(colours) > 1)
        # The right answer is among them; without comparison it is their one colour.
        assert qa.answer in colours and (need or colours == {qa.answer})
    assert kinds == {True, False}


def test_linear_probe_scores_a_linear_target_near_one_and_noise_near_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    linear = x @ rng.normal(size=(8, 2)) + 3.0
    r2, pred = probe.linear_fit_r2(x, linear)
    assert pred.shape == (120, 2) and (r2 > 1 - 1e-9).all()
    r2, _ = probe.linear_fit_r2(x, rng.normal(size=(400, 2)))
    assert (r2 < 0.1).all()


def test_pair_order_accuracy_counts_the_pairs_far_enough_apart():
    rng = np.random.default_rng(1)
    true = rng.integers(0, 336, size=30).astype(float)
    pred = true + rng.normal(scale=25, size=30)
    kept = total = 0
    for i, j in itertools.combinations(range(30), 2):
        if abs(true[i] - true[j]) >= 16:
            total += 1
            kept += (pred[i] > pred[j]) == (true[i] > true[j])
    assert 0 < kept < total
    assert probe.pair_order_accuracy(pred, true, 16) == pytest.approx(kept / total, abs=1e-12)
