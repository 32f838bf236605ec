"""LLaVA-NeXT through real vLLM (CPU) on a checkpoint the project builds
(``python -m vllm_vtprune.embedded.build --family llava_next``): anyres tiles pruned
under one per-image budget, parity with the transformers reference path for every
method served on the family at two budgets, several images of different sizes per
prompt, and the family's refusals."""
from __future__ import annotations

import json
import os

import pytest

from tests.serving.conftest import offline_llm, shutdown
from vllm_vtprune import families, registry
from vllm_vtprune import spec as spec_mod
from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.families import llava_next

NEXT = families.for_architecture(llava_next.ARCHITECTURE)
SERVED = [m for m in registry.served() if m not in registry.in_llm()
          and registry.get(m).needs_for({}) <= NEXT.provides]
# An integer budget and a ratio of each image's patches (the natural spelling for
# images whose token count depends on their size).
PARITY_SPECS = [f"{m}:{b}" for m in SERVED for b in (48, "0.03")]
# (width, height): a square image gets a 1x2 grid with half of it padding, the others
# other grids (2x1, 1x3 / 3x1 of 336 px tiles) and unpadding on either axis.
SIZES = [(336, 336), (504, 336), (336, 700), (700, 300)]
MAX_FLIPPED = 0.15


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    from vllm_vtprune.embedded.build import build

    return str(build("llava_next", tmp_path_factory.mktemp("llava-next") / "model"))


def _requests():
    """Single-image prompts of every size, and two-image prompts of two sizes."""
    pairs = list(sv.iter_questions(sv.HELDOUT_SEED, 8, start=7300))
    reqs = [([img.resize(SIZES[i % len(SIZES)])], qa.question)
            for i, (img, qa) in enumerate(pairs[:6])]
    for i, (img, qa) in enumerate(pairs[6:]):
        other = pairs[i][0]
        reqs.append(([img.resize(SIZES[1 + i]), other.resize(SIZES[3 - i])], qa.question))
    return reqs


def _prompt(question: str, num_images: int) -> str:
    return "USER: " + "<image>\n" * num_images + f"{question} ASSISTANT:"


def _llm(model: str, **kwargs):
    return offline_llm(model, max_model_len=8192, **kwargs)


def _generate(llm, reqs, spec=None):
    from vllm import SamplingParams

    batch = []
    for images, question in reqs:
        req = {"prompt": _prompt(question, len(images)), "multi_modal_data": {"image": images}}
        if spec is not None:
            req["mm_processor_kwargs"] = {"vtprune": spec}
        batch.append(req)
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    return [(o.outputs[0].text.strip(), len(o.prompt_token_ids)) for o in outs]


@pytest.fixture(scope="module")
def stock(next_model):
    llm = _llm(next_model)
    try:
        return _generate(llm, _requests())
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def pruning_llm(next_model, stock, tmp_path_factory):
    os.environ["VTPRUNE_TRACE"] = str(tmp_path_factory.mktemp("trace") / "next.jsonl")
    llm = _llm(next_model, hf_overrides={"architectures": [llava_next.ARCHITECTURE]})
    yield llm
    shutdown(llm)
    del os.environ["VTPRUNE_TRACE"]


@pytest.fixture(scope="module")
def reference(next_model):
    from vllm_vtprune.hf import HfReference

    return HfReference.load(next_model)


def test_the_family_serves_every_method():
    assert {"resprune", "divprune", "visionzip", "random", "dcp"} <= set(SERVED)
    assert set(families.served_methods(NEXT)) == set(registry.served())


def test_no_spec_behaves_exactly_like_stock_llava_next(stock, pruning_llm):
    assert _generate(pruning_llm, _requests()) == stock


def _traced(llm, req, spec):
    """Answer, prompt length and the kept sets the engine traced for one request."""
    path = os.environ["VTPRUNE_TRACE"]
    start = os.path.getsize(path) if os.path.exists(path) else 0
    (answer, length), = _generate(llm, [req], spec)
    with open(path) as f:
        f.seek(start)
        kept = [json.loads(line)["kept"] for line in f]
    return answer, length, kept


@pytest.mark.parametrize("spec", PARITY_SPECS)
def test_greedy_outputs_match_transformers_reference(pruning_llm, reference, spec):
    """Placeholder counts exact; kept sets equal up to rounding (vLLM's CLIP and
    transformers' round differently in the last bits, which can flip a near-tie of a
    greedy pick: at most MAX_FLIPPED of an image's kept tokens); the answer equal
    wherever every kept set is."""
    parsed = spec_mod.parse(spec)
    same_sets = 0
    for images, question in _requests():
        prompt = _prompt(question, len(images))
        answer, length, kept = _traced(pruning_llm, (images, question), spec)
        ref_answer, pruned = reference.generate(prompt, images, parsed)
        expected = [parsed.tokens_for(llava_next.prunable_tokens(
            reference.model.config, *im.size)) for im in images]
        assert [p.tokens.shape[0] for p in pruned] == expected
        assert length == len(reference.tokenizer(prompt).input_ids) - len(images) + sum(expected)
        assert len(kept) == len(images), kept
        flips = [len(set(k) ^ set(p.kept.tolist())) / 2 / len(k) if p.kept is not None else 0
                 for k, p in zip(kept, pruned)]
        assert max(flips) <= MAX_FLIPPED, (question, flips)
        if not any(flips):
            same_sets += 1
            assert answer == ref_answer.strip(), (question, answer, ref_answer)
    assert same_sets >= len(_requests()) // 2, same_sets


@pytest.mark.parametrize("spec, named", [("fastv:64", "--vtprune fastv:K")])
def test_methods_inside_the_llm_need_a_server_started_with_one(pruning_llm, spec, named):
    from vllm import SamplingParams

    (image,), question = _requests()[0]
    req = {"prompt": _prompt(question, 1), "multi_modal_data": {"image": image},
           "mm_processor_kwargs": {"vtprune": spec}}
    with pytest.raises(ValueError, match=named):
        pruning_llm.generate(req, SamplingParams(max_tokens=1), use_tqdm=False)


def test_server_reports_each_requests_real_counts(next_model, tmp_path):
    """`vllm serve NEXT --vtprune resprune:0.25`: two images of different sizes in one
    chat request; usage.vtprune counts every image's tokens before (newlines included)
    and after pruning."""
    from openai import OpenAI

    from tests.serving.conftest import chat_messages, serving

    images = [im for im in _requests()[6][0]]
    with serving(tmp_path / "serve.log", tmp_path / "trace.jsonl", spec="resprune:0.25",
                 model=next_model, max_model_len=8192) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model="shapes-llava", max_tokens=2, temperature=0,
            messages=chat_messages("how many circles are there ?", images))
    config = _config(next_model)
    layouts = [llava_next.layout_of(config, (im.height, im.width)) for im in images]
    fig = r.usage.vtprune
    assert fig["images"] == 2
    assert fig["visual_tokens_before"] == sum(lay.num_tokens for lay in layouts)
    assert fig["visual_tokens_after"] == sum(round(0.25 * lay.num_patches) for lay in layouts)


def _config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)
