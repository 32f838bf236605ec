"""Qwen2-VL and Qwen2.5-VL through real vLLM (CPU) on small random checkpoints the
project builds (``python -m vllm_vtprune.embedded.build --family qwen2_vl|qwen2_5_vl``):
no spec is stock vLLM; every method served on the family, at a ratio and an integer
budget, matches the transformers reference with kept tokens at their unpruned M-RoPE
positions, on prompts with two images of different sizes; a reference that renumbers
the positions after pruning does not match.

The models are random, so their answers are words of nearly equal probability; the
comparison is on the log-probabilities of every generated token (vLLM's and the
reference's, teacher-forced on vLLM's tokens), which any misplaced token or position
moves far beyond the float32 rounding of two implementations."""
from __future__ import annotations

import os

import pytest
import torch

from tests.serving.conftest import offline_llm, shutdown
from vllm_vtprune import families, registry
from vllm_vtprune import spec as spec_mod
from vllm_vtprune.data import shapes_vqa as sv

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
QUESTIONS = ["what color is the square ?", "how many circles are there ?",
             "is there a red triangle ?"]
# (width, height): wide, tall, square, small; the grid (and token count) follows the size
SIZES = [(336, 252), (224, 392), (280, 280), (140, 196)]
# float32 vLLM vs transformers: measured differences are below 8e-6 (x86 AVX-512 here; other
# CPUs round differently, hence the margin); positions renumbered after pruning move the
# log-probabilities by 0.85 and more
ATOL = 1e-4
MAX_TOKENS = 3


def _served(family) -> list[str]:
    return [m for m in families.served_methods(family) if m not in registry.in_llm()]


def _prompt(num_images: int, question: str) -> str:
    return ("<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * num_images
            + f"{question}<|im_end|>\n<|im_start|>assistant\n")


def _requests():
    images = [s.image for s in (sv.make_sample(sv.HELDOUT_SEED, 7400 + i) for i in range(4))]
    return [([images[0].resize(SIZES[0]), images[1].resize(SIZES[1])], QUESTIONS[0]),
            ([images[2].resize(SIZES[2])], QUESTIONS[1]),
            ([images[3].resize(SIZES[3]), images[0].resize(SIZES[2])], QUESTIONS[2])]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    from vllm_vtprune.embedded.build import build

    path = str(build(request.param, tmp_path_factory.mktemp(request.param) / "model"))
    from transformers import AutoConfig

    return families.for_config(AutoConfig.from_pretrained(path)), path


def _llm(model: str, **kwargs):
    return offline_llm(model, max_model_len=4096, **kwargs)


def _generate(llm, reqs, spec=None):
    from vllm import SamplingParams

    batch = []
    for images, question in reqs:
        req = {"prompt": _prompt(len(images), question), "multi_modal_data": {"image": images}}
        if spec is not None:
            req["mm_processor_kwargs"] = {"vtprune": spec}
        batch.append(req)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5,
                            ignore_eos=True)
    outs = llm.generate(batch, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), len(o.prompt_token_ids),
             [{k: v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs])
            for o in outs]


@pytest.fixture(scope="module")
def engines(family_model):
    family, path = family_model
    stock = _llm(path)
    try:
        stock_out = _generate(stock, _requests())
    finally:
        shutdown(stock)
    llm = _llm(path, hf_overrides={"architectures": [family.architecture]})
    yield family, path, stock_out, llm
    shutdown(llm)


@pytest.fixture(scope="module")
def reference(family_model):
    from vllm_vtprune.hf import HfReference

    return HfReference.load(family_model[1])


def _reference_logprobs(reference, images, question, spec, tokens, renumber=False):
    """The reference's log-probabilities at each of vLLM's generated tokens."""
    pruned, ids, feats = reference.prompt_inputs(_prompt(len(images), question), images, spec)
    positions = reference.positions(ids, pruned)
    if renumber:
        positions = torch.arange(len(ids)).expand(3, -1)
    steps = []
    with torch.no_grad():
        for i in range(len(tokens)):
            pos = torch.cat([positions, positions[:, -1:] + torch.arange(1, i + 1)], dim=1)
            logits = reference.last_logits(ids + tokens[:i], feats, pos)
            steps.append(torch.log_softmax(logits.float(), -1))
    return steps, len(ids), pruned


def _max_gap(vllm_steps, ref_steps) -> float:
    return max(abs(lp - float(ref[t])) for step, ref in zip(vllm_steps, ref_steps)
               for t, lp in step.items())


def test_no_spec_is_stock_vllm(engines):
    family, _, stock_out, llm = engines
    out = _generate(llm, _requests())
    for (tokens, length, steps), (s_tokens, s_length, s_steps) in zip(out, stock_out):
        assert length == s_length
        for token, s_token, step, s_step in zip(tokens, s_tokens, steps, s_steps):
            shared = step.keys() & s_step.keys()
            assert shared and max(abs(step[t] - s_step[t]) for t in shared) <= ATOL
            if token != s_token:  # stock batches the request's images in one encoder call:
                # a different greedy pick is a near-tie within that rounding, and the
                # continuations differ from there on
                assert abs(s_step[token] - s_step[s_token]) <= 2 * ATOL, (token, s_token)
                break


@pytest.mark.parametrize("budget", ["0.25", "12"])
def test_every_served_method_matches_the_reference_at_unpruned_positions(engines, reference,
                                                                        budget):
    family, _, _, llm = engines
    assert {"resprune", "divprune", "random", "visionzip"} <= set(_served(family))
    for method in _served(family):
        spec = f"{method}:{budget}"
        parsed = spec_mod.parse(spec)
        for (images, question), (tokens, length, steps) in zip(
                _requests(), _generate(llm, _requests(), spec)):
            ref_steps, ref_length, pruned = _reference_logprobs(reference, images, question,
                                                                parsed, tokens)
            full = [p.tokens.shape[0] for p in reference.image_tokens(
                reference.pixel_values(images), None, [])]
            assert [p.tokens.shape[0] for p in pruned] == [parsed.tokens_for(n) for n in full]
            assert length == ref_length
            assert _max_gap(steps, ref_steps) <= ATOL, spec


def test_a_reference_with_renumbered_positions_does_not_match(engines, reference):
    """The comparison above can see positions: counted after pruning, they differ."""
    _, _, _, llm = engines
    images, question = _requests()[0]
    (tokens, _, steps), = _generate(llm, [_requests()[0]], "resprune:0.25")
    renumbered, _, _ = _reference_logprobs(reference, images, question,
                                           spec_mod.parse("resprune:0.25"), tokens, True)
    assert _max_gap(steps, renumbered) > 100 * ATOL


@pytest.mark.parametrize("spec,match", [("fastv:16", "decoder attention"),
                                        ("dcp:16,kn=0", "option 'kn'")])
def test_specs_the_engine_cannot_serve_are_refused_per_request(engines, spec, match):
    """Every method is served on Qwen-VL; a method inside the LLM still needs an engine
    started with one, and a bad option is refused, each naming what was wrong."""
    from vllm import SamplingParams

    _, _, _, llm = engines
    images, question = _requests()[1]
    req = {"prompt": _prompt(1, question), "multi_modal_data": {"image": images},
           "mm_processor_kwargs": {"vtprune": spec}}
    with pytest.raises(ValueError, match=match):
        llm.generate(req, SamplingParams(max_tokens=1), use_tqdm=False)


def test_a_bad_server_spec_stops_vllm_serve(family_model):
    from tests.serving.test_startup_errors import _serve

    _, path = family_model
    proc = _serve(path, "dcp:64,kn=0", timeout=120)
    assert proc.returncode == 2
    assert "option 'kn'" in proc.stderr


def test_server_reports_each_requests_real_counts(family_model, tmp_path):
    """`vllm serve QWEN --vtprune resprune:0.25`: usage.vtprune counts each image's
    tokens (which depend on its size) before and after pruning."""
    from openai import OpenAI

    from tests.serving.conftest import chat_messages, serving

    family, path = family_model
    images, question = _requests()[0]
    with serving(tmp_path / "serve.log", tmp_path / "trace.jsonl", spec="resprune:0.25",
                 model=path, max_model_len=4096) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="shapes-llava", max_tokens=2, temperature=0,
                                           messages=chat_messages(question, images))
    full = [_tokens_of(path, im) for im in images]
    fig = r.usage.vtprune
    assert (fig["images"], fig["visual_tokens_before"]) == (2, sum(full))
    assert fig["visual_tokens_after"] == sum(round(0.25 * n) for n in full)
    assert r.usage.prompt_tokens < sum(full)  # the placeholders are the kept tokens


def _tokens_of(path: str, image) -> int:
    """An image's merged-token count, from the processor's own grid."""
    from transformers import AutoProcessor

    grid = AutoProcessor.from_pretrained(path).image_processor(
        images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // 4


def test_a_request_answers_alike_alone_and_batched(engines):
    _, _, _, llm = engines
    reqs = _requests()
    alone = _generate(llm, [reqs[0]], "resprune:0.25")[0]
    batched = _generate(llm, [reqs[1], reqs[0], reqs[2]], "resprune:0.25")[1]
    assert alone[:2] == batched[:2]
    assert max(abs(lp - batched[2][i][t]) for i, step in enumerate(alone[2])
               for t, lp in step.items()) <= ATOL


def test_text_conditioned_pruning_is_not_reused_for_another_question(engines, tmp_path):
    """The same image under resprune with two questions: the encoder runs twice (the
    nouns are in the multimodal hash); asked again, the first question hits the cache."""
    import json

    _, _, _, llm = engines
    trace = tmp_path / "kept.jsonl"
    os.environ["VTPRUNE_TRACE"] = str(trace)
    try:
        image = sv.make_sample(sv.HELDOUT_SEED, 7450).image.resize(SIZES[0])  # not seen before
        for question in ("how many circles are there ?", "what color is the square ?",
                         "how many circles are there ?"):
            _generate(llm, [([image], question)], "resprune:0.25")
    finally:
        del os.environ["VTPRUNE_TRACE"]
    runs = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(runs) == 2
    assert runs[0]["text_ids"] != runs[1]["text_ids"]
