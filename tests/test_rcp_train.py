"""RCP training on the embedded (tiny, frozen) LLaVA: the losses are the paper's equations
(against slow float64 loops), only the plug-in modules learn, the data formats load."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vllm_vtprune import rcp_train
from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded import SMALL_MODEL, model_path
from vllm_vtprune.methods import rcp


@pytest.fixture(scope="module")
def reference():
    from vllm_vtprune.hf import HfReference

    return HfReference.load(model_path(SMALL_MODEL))


@pytest.fixture(scope="module")
def modules(reference):
    text = reference.model.config.text_config
    return rcp.build_modules(text.hidden_size, text.num_hidden_layers, seed=0)


def _moments64(h):
    """Eqs. 16-17 by loops: per-dimension mean and second central moment over rows."""
    rows, dims = h.shape
    mu = [sum(float(h[t, c]) for t in range(rows)) / rows for c in range(dims)]
    v = [max(0.0, sum(float(h[t, c]) ** 2 for t in range(rows)) / rows - mu[c] ** 2)
         for c in range(dims)]
    return mu, v


def _repair64(student, teacher):
    """Eq. 18 per layer, averaged over layers (sqrt(v + 1e-8) as the module does)."""
    terms = []
    for s, t in zip(student, teacher):
        (ms, vs), (mt, vt) = _moments64(s), _moments64(t)
        d = len(ms)
        terms.append(sum((a - b) ** 2 for a, b in zip(ms, mt)) / d
                     + sum((math.sqrt(a + 1e-8) - math.sqrt(b + 1e-8)) ** 2
                           for a, b in zip(vs, vt)) / d)
    return sum(terms) / len(terms)


def test_losses_are_the_equations(reference, modules):
    """Task: cross-entropy of the answer tokens; repair: Eqs. 16-18; sparsity: Eqs.
    19-21 (layers inherit the last pruning layer's mask, earlier ones keep all)."""
    image, qa = next(iter(sv.iter_questions(sv.TRAIN_SEED, 1, start=11)))
    enc = rcp_train.encode(reference, rcp_train.Sample(image, qa.question, qa.answer))
    forward = rcp_train.MaskedForward(reference)
    forward.repair_layers = tuple(sorted(modules.adapters))
    torch.manual_seed(0)
    with torch.no_grad():
        _, teacher, _ = forward(enc, None, 1.0)
        student = forward(enc, modules, 1.0)
        got = rcp_train.losses(student, teacher, enc, modules.num_layers, 0.25)
    logits, hidden, masks = student
    task = 0.0
    for row, target in zip(logits.double(), enc.targets.tolist()):
        top = float(row.max())
        task += -(float(row[target]) - top - math.log(sum(math.exp(float(x) - top) for x in row)))
    task /= len(enc.targets)
    layers = sorted(hidden)
    repair = _repair64([hidden[l].double() for l in layers], [teacher[l].double() for l in layers])
    n, rates, current = len(enc.visual), [], 1.0
    for layer in range(modules.num_layers):
        if layer in masks:
            current = float(masks[layer].sum()) / n
        rates.append(current)
    sparse = abs(sum(rates) / len(rates) - 0.25)
    assert abs(float(got["task"]) - task) < 1e-4 * max(1.0, task)
    assert abs(float(got["repair"]) - repair) < 1e-4 * max(1e-3, repair)
    assert abs(float(got["sparse"]) - sparse) < 1e-6
    expected_total = 1.5 * task + 40 * repair + 200 * sparse
    assert abs(float(got["total"]) - expected_total) < 1e-3 * max(1.0, expected_total)
    assert sorted(masks) == list(modules.pruning_layers)
    prev = None  # cumulative: nothing comes back
    for layer in sorted(masks):
        if prev is not None:
            assert bool((masks[layer] <= prev).all())
        prev = masks[layer]


def test_masked_forward_without_pruning_is_the_transformers_model(reference):
    """With no modules, the training forward is the frozen LLaVA's own forward."""
    image, qa = next(iter(sv.iter_questions(sv.TRAIN_SEED, 1, start=12)))
    enc = rcp_train.encode(reference, rcp_train.Sample(image, qa.question, qa.answer))
    with torch.no_grad():
        logits, _, _ = rcp_train.MaskedForward(reference)(enc, None, 1.0)
        lm = reference.model.model.language_model
        hidden = lm(inputs_embeds=enc.embeds[None]).last_hidden_state[0]
        expected = reference.model.lm_head(hidden[enc.answer])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_training_changes_only_the_plugin_modules(reference, tmp_path):
    text = reference.model.config.text_config
    modules = rcp.build_modules(text.hidden_size, text.num_hidden_layers, seed=1)
    backbone = {k: v.clone() for k, v in reference.model.state_dict().items()}
    before = {k: v.clone() for k, v in modules.tensors().items()}
    samples = rcp_train.shapes_samples(sv.TRAIN_SEED, 4, start=20)
    history = rcp_train.train(reference, modules, samples, steps=2, batch=2, lr=1e-2,
                              budget=128, seed=0, log=lambda m: None)
    assert len(history) == 2 and all(math.isfinite(h["total"]) for h in history)
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    after = modules.tensors()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("pruner.") for k in changed)
    assert any(k.startswith("adapter.") for k in changed)
    out = str(tmp_path / "rcp.safetensors")
    rcp.save_checkpoint(modules, out)
    loaded = rcp.load_checkpoint(out)
    assert loaded.pruning_layers == modules.pruning_layers
    for k, v in loaded.tensors().items():
        assert torch.equal(v, after[k]), k


def test_jsonl_records_load_and_a_bad_one_names_its_line(tmp_path):
    images = list(sv.iter_questions(sv.TRAIN_SEED, 3, start=30))
    lines = []
    for i, (image, qa) in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": qa.question,
                                 "answer": qa.answer}))
    good = tmp_path / "train.jsonl"
    good.write_text("\n".join(lines) + "\n")
    samples = rcp_train.jsonl_samples(str(good))
    assert [s.question for s in samples] == [qa.question for _, qa in images]
    assert samples[0].image.size == images[0][0].size
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + json.dumps({"image": "missing.png", "question": "q",
                                                 "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        rcp_train.jsonl_samples(str(bad))


def test_schedule_anneals_temperature_and_target():
    assert rcp_train.schedule(0, 100, 1e-3, 0.2) == (1e-3, 1.5, 1.0)
    rate, tau, target = rcp_train.schedule(99, 100, 1e-3, 0.2)
    assert abs(rate - 1e-4) < 1e-12 and abs(tau - 0.2) < 1e-12 and abs(target - 0.2) < 1e-12
    assert abs(rcp_train.schedule(15, 100, 1e-3, 0.2)[2] - 0.6) < 1e-9  # halfway to r*
    # a tail past the end holds the last values (no cosine rising again, no tau below 0.2)
    for step in (100, 150, 1000):
        assert rcp_train.schedule(step, 100, 1e-3, 0.2) == (rate, tau, target)


def test_noise_fades_out_before_the_end():
    scales = [rcp_train.noise_scale(step, 101) for step in range(101)]
    assert scales[:61] == [1.0] * 61 and scales[90:] == [0.0] * 11
    assert abs(scales[75] - 0.5) < 1e-9
    assert all(a >= b for a, b in zip(scales, scales[1:]))
    assert [rcp_train.noise_scale(step, 101) for step in (101, 140, 500)] == [0.0] * 3


def test_chunks_follow_the_whole_runs_schedule(reference):
    """Two chunks of 2 steps (the second at first_step=2) see the temperatures, noise
    scales, r* and learning rates of steps 2-3 of one 4-step run, and their own
    sample order (not the first chunk's again)."""
    text = reference.model.config.text_config
    samples = rcp_train.shapes_samples(None, 6, start=20)
    runs = {}
    for first in (0, 2):
        modules = rcp.build_modules(text.hidden_size, text.num_hidden_layers, seed=1)
        seen = []
        encode = rcp_train.encode
        rcp_train.encode = lambda ref, s, _seen=seen: (_seen.append(s.question),
                                                       encode(ref, s))[1]
        try:
            runs[first] = (rcp_train.train(reference, modules, samples, steps=2, batch=2,
                                           lr=1e-2, budget=128, seed=0, log=lambda m: None,
                                           calibrate=False, first_step=first,
                                           total_steps=4), seen)
        finally:
            rcp_train.encode = encode
    target = rcp_train.budget_fraction(128, reference)
    for first, (history, _) in runs.items():
        for h in history:
            rate, tau, r = rcp_train.schedule(h["step"], 4, 1e-2, target, warmup=True)
            assert (h["tau"], h["target"]) == (round(tau, 4), round(r, 4))
            assert h["noise"] == round(rcp_train.noise_scale(h["step"], 4), 4)
        assert [h["step"] for h in history] == [first, first + 1]
    assert runs[0][1] != runs[2][1]


def test_both_splits_alternate_standard_and_hard():
    both = rcp_train.shapes_samples(None, 5, start=7, split="both")
    standard = list(sv.iter_questions(sv.STANDARD.train_seed, 3, 7, split="standard"))
    hard = list(sv.iter_questions(sv.HARD.train_seed, 2, 7, split="hard"))
    expect = [standard[0], hard[0], standard[1], hard[1], standard[2]]
    assert [s.question for s in both] == [qa.question for _, qa in expect]
    assert [s.answer for s in both] == [qa.answer for _, qa in expect]
    held = rcp_train.shapes_samples(None, 2, split="hard", heldout=True)
    assert [s.question for s in held] == [
        qa.question for _, qa in sv.iter_questions(sv.HARD.heldout_seed, 2, split="hard")]


def test_serving_calibration_leaves_the_count_to_the_plan(reference):
    """After calibrate_for_serving, the first pruning layer's threshold (Eq. 8, counted
    here from the pruner's logits, not by the calibration's quantile) keeps twice the
    serving budget's planned count on the calibration samples, and every later one twice
    the modules' later share of the tokens live there under the trained budget's counts."""
    text = reference.model.config.text_config
    modules = rcp.build_modules(text.hidden_size, text.num_hidden_layers, seed=2)
    samples = rcp_train.shapes_samples(None, 4, start=50, split="standard")
    rcp_train.calibrate_for_serving(reference, modules, samples, 128, trained_budget=64)
    n = reference.tower.grid[0] * reference.tower.grid[1]
    layers = modules.pruning_layers
    forward = rcp_train.MaskedForward(reference)
    with torch.no_grad():
        forward.record = {}
        for s in samples:
            forward(rcp_train.encode(reference, s), modules, 1.0, hard=True)
        first_logits = forward.record[layers[0]]
        forward.record = {}
        for s in samples:
            enc = rcp_train.encode(reference, s)
            forward.counts = modules.plan(n, 64)
            forward(enc, modules, 1.0, noise=0.0)
    first = modules.plan(n, 128)[layers[0]]
    kept = sum(int((x > 0).sum()) for x in first_logits)
    # quantile interpolation may put one logit on the wrong side per layer
    assert abs(kept - rcp_train.SERVING_MARGIN * first * len(samples)) <= 1
    assert sum(len(x) for x in first_logits) == len(samples) * n
    for layer, share in zip(layers[1:], modules.later_shares):
        live = forward.record[layer]
        assert all(len(x) == forward.counts[max(l for l in layers if l < layer)] for x in live)
        want = rcp_train.SERVING_MARGIN * share * sum(len(x) for x in live)
        assert abs(sum(int((x > 0).sum()) for x in live) - want) <= 1


def test_fixed_count_training_masks_keep_the_served_counts(reference, modules):
    """With counts set (the default training), each pruning layer's cumulative training
    mask keeps exactly the modules' planned counts, and the loss's sparsity term is
    reported but carries no weight."""
    image, qa = next(sv.iter_questions(sv.TRAIN_SEED, 1, start=11))
    enc = rcp_train.encode(reference, rcp_train.Sample(image, qa.question, qa.answer))
    forward = rcp_train.MaskedForward(reference)
    forward.repair_layers = tuple(sorted(modules.adapters))
    forward.counts = modules.plan(len(enc.visual), 64)
    modules.train(True)
    try:
        student = forward(enc, modules, 0.5, noise=1.0)
    finally:
        modules.train(False)
    _, _, masks = student
    for layer, mask in masks.items():
        assert int(mask.detach().sum()) == forward.counts[layer]
        assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        _, teacher, _ = forward(enc, None, 0.5)
    terms = rcp_train.losses(student, teacher, enc, modules.num_layers, 0.1, sparse_weight=0.0)
    want = rcp_train.TASK_WEIGHT * terms["task"] + rcp_train.REPAIR_WEIGHT * terms["repair"]
    assert float(terms["sparse"]) > 0 and torch.allclose(terms["total"], want)


def test_chunked_command_line_run_resumes_and_calibrates_for_serving(tmp_path):
    """`python -m vllm_vtprune.rcp_train` in two chunks: the second continues the step
    count and records the first; --serve-budget stores the trained and the serving
    biases, and a calibrated checkpoint is refused as a chunk to resume; the first chunk's
    --query-score, --intrinsic-rows and --later-shares hold in the second; a malformed
    --later-shares is refused."""
    common = ["--model", model_path(SMALL_MODEL), "--split", "standard", "--budget", "64",
              "--batch", "1", "--samples", "4", "--eval", "0", "--total-steps", "2"]
    first, second = str(tmp_path / "c1.safetensors"), str(tmp_path / "c2.safetensors")
    other = next(q for q in rcp.QUERY_SCORES if q != rcp.QUERY_SCORE)  # not the flag's default
    with pytest.raises(SystemExit):  # argparse names the flag and what it accepts
        rcp_train.main(common + ["--steps", "1", "--out", first, "--later-shares", "0.3,x"])
    assert rcp_train.main(common + ["--steps", "1", "--out", first, "--query-score", other,
                                    "--intrinsic-rows", "last", "--later-shares", "0.5,0.9"]) == 0
    assert rcp_train.main(common + ["--steps", "1", "--init", first, "--out", second,
                                    "--serve-budget", "128"]) == 0
    resumed = rcp.load_checkpoint(second)
    assert {p.query_score for p in resumed.pruners.values()} == {other}  # the checkpoint's
    assert {p.intrinsic_rows for p in resumed.pruners.values()} == {"last"}
    assert resumed.later_shares == (0.5, 0.9)  # saved in the first chunk, held by --init
    info = resumed.info
    assert info["steps"] == 2 and info["resumed_from"]["steps"] == 1
    assert set(info["serving_biases"]) == {str(l) for l in info["trained_biases"]}
    report = json.loads(open(second + ".json").read())
    assert [h["step"] for h in report["history"]] == [1]
    with pytest.raises(SystemExit, match="calibrated for serving"):
        rcp_train.main(common + ["--steps", "1", "--init", second, "--out", first])
    # calibration alone trains nothing: the info keeps the checkpoint's training settings
    third = str(tmp_path / "c3.safetensors")
    assert rcp_train.main(common + ["--steps", "0", "--init", first, "--out", third,
                                    "--serve-budget", "128", "--lr", "0.5",
                                    "--freeze-pruners"]) == 0
    info = rcp.load_checkpoint(third).info
    first_info = rcp.load_checkpoint(first).info
    assert info["steps"] == 1 and "serving_biases" in info
    assert (info["lr"], info["trained"]) == (first_info["lr"], "pruners and adapters") != (0.5, "adapters")


def _distill64(logits, live, target):
    """-sum_i p_i log softmax(z)_i over the live tokens, p the target renormalised there,
    by loops in float64."""
    idx = [i for i in range(len(logits)) if bool(live[i])]
    z = [float(logits[i]) for i in idx]
    t = [float(target[i]) for i in idx]
    top = max(z)
    log_norm = top + math.log(sum(math.exp(v - top) for v in z))
    return -sum(ti / sum(t) * (zi - log_norm) for ti, zi in zip(t, z))


def test_distillation_term_is_the_cross_entropy_to_the_teachers_answer_attention(reference,
                                                                                    modules):
    """The teacher's answer row's head-mean attention per layer, averaged from layer l-1
    on for the pruner at l, and the pruners' softmax over the live tokens against it
    renormalised there (by loops in float64), mean over pruning layers, at its weight in
    the total; only the pruners get its gradient."""
    image, qa = next(iter(sv.iter_questions(sv.TRAIN_SEED, 1, start=13)))
    enc = rcp_train.encode(reference, rcp_train.Sample(image, qa.question, qa.answer))
    forward = rcp_train.MaskedForward(reference)
    forward.repair_layers = tuple(sorted(modules.adapters))
    forward.counts = modules.plan(len(enc.visual), 64)
    forward.attention = []
    lm = reference.model.model.language_model
    implementation = lm.config._attn_implementation
    lm.set_attn_implementation("eager")  # sdpa returns no attention weights
    try:
        with torch.no_grad():
            _, teacher, _ = forward(enc, None, 1.0)
            out = lm(inputs_embeds=enc.embeds[None], output_attentions=True)
    finally:
        lm.set_attn_implementation(implementation)
    per_layer, forward.attention = forward.attention, None
    row, vis = int(enc.answer[0]), enc.visual.tolist()
    assert len(per_layer) == len(out.attentions) == modules.num_layers
    for got, attn in zip(per_layer, out.attentions):  # transformers' own attention
        want = [sum(float(attn[0, h, row, c]) for h in range(attn.shape[1])) / attn.shape[1]
                for c in vis]
        assert max(abs(a - b) for a, b in zip(got.tolist(), want)) < 1e-5
    targets = rcp_train.attention_targets(per_layer, modules.pruning_layers)
    for layer, t in targets.items():
        slow = [sum(float(per_layer[j][c]) for j in range(layer - 1, modules.num_layers))
                / (modules.num_layers - layer + 1) for c in range(len(vis))]
        assert max(abs(a - b) for a, b in zip(t.tolist(), slow)) < 1e-6
    forward.scored = {}
    torch.manual_seed(0)
    student = forward(enc, modules, 1.0, noise=0.0)
    scored, forward.scored = forward.scored, None
    assert sorted(scored) == list(modules.pruning_layers)
    assert int(scored[modules.pruning_layers[-1]][1].sum()) < len(vis)  # later: live only
    terms = rcp_train.losses(student, teacher, enc, modules.num_layers, 0.1, sparse_weight=0.0,
                             repair_weight=0.2, distill=(scored, targets), distill_weight=3.0)
    slow = sum(_distill64(z.detach(), live, targets[l]) for l, (z, live) in scored.items())
    slow /= len(scored)
    assert abs(float(terms["distill"].detach()) - slow) < 1e-4 * max(1.0, slow)
    want = 1.5 * terms["task"] + 0.2 * terms["repair"] + 3.0 * terms["distill"]
    assert torch.allclose(terms["total"], want, rtol=1e-5)
    for p in modules.parameters():
        p.grad = None
    terms["distill"].backward()
    try:
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                   for m in modules.pruners.values() for p in m.parameters())
        assert all(p.grad is None for m in modules.adapters.values() for p in m.parameters())
    finally:
        for p in modules.parameters():
            p.grad = None


def test_distill_only_cuts_the_masks_straight_through_gradient(reference, modules):
    """With cut masks the task and repair terms reach the adapters but not the pruners,
    whose only gradient is then the distillation term's."""
    image, qa = next(iter(sv.iter_questions(sv.TRAIN_SEED, 1, start=14)))
    enc = rcp_train.encode(reference, rcp_train.Sample(image, qa.question, qa.answer))
    forward = rcp_train.MaskedForward(reference)
    forward.repair_layers = tuple(sorted(modules.adapters))
    forward.counts = modules.plan(len(enc.visual), 64)
    with torch.no_grad():
        _, teacher, _ = forward(enc, None, 1.0)

    def pruner_grads(cut: bool) -> bool:
        forward.cut_masks = cut
        for p in modules.parameters():
            p.grad = None
        try:
            student = forward(enc, modules, 1.0, noise=0.0)
            terms = rcp_train.losses(student, teacher, enc, modules.num_layers, 0.1,
                                     sparse_weight=0.0, repair_weight=40.0)
            terms["total"].backward()
            assert any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                       for m in modules.adapters.values() for p in m.parameters())
            return any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                       for m in modules.pruners.values() for p in m.parameters())
        finally:
            forward.cut_masks = False
            for p in modules.parameters():
                p.grad = None

    assert pruner_grads(False) and not pruner_grads(True)
    with pytest.raises(ValueError, match="distill_weight"):
        rcp_train.train(reference, modules, [], steps=1, batch=1, lr=1e-3, budget=64, seed=0,
                        distill_only=True)
