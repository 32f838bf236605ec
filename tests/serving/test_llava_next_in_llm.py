"""FastV, RCP and Polymorphic inside LLaVA-NeXT's decoder through real vLLM (CPU), on the checkpoint the
project builds: the same masked decoder and per-request plans as on LLaVA-1.5, with
images of different sizes (their token counts differ, newlines included) and two images
in one prompt, batched with other specs; each answer is the transformers reference
loop's (pruned rows removed)."""
from __future__ import annotations

import pytest
import torch

from tests.reference import DECISION_MARGIN, decision_margins
from tests.serving.conftest import in_llm_offline_llm, shutdown
from vllm_vtprune import pipeline
from vllm_vtprune import spec as spec_mod
from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.families import llava_next

SERVER_SPEC = "fastv:48"  # installs the masked decoder; each request brings its own spec
SPECS = ["fastv:48", "fastv:0.05", "rcp:48", "rcp:0.05", "polymorphic:48", "polymorphic:0.05"]
SIZES = [(336, 336), (504, 336), (336, 700), (700, 300)]
LOGPROB_TOLERANCE = 1e-4  # the two float paths differ by ~1e-6 (see test_in_llm.py)
DECODE_TOKENS = 8


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    from vllm_vtprune.embedded.build import build

    return str(build("llava_next", tmp_path_factory.mktemp("llava-next") / "model"))


@pytest.fixture(scope="module")
def reference(next_model):
    from vllm_vtprune.hf import HfReference

    return HfReference.load(next_model)


@pytest.fixture(scope="module")
def llm(next_model):
    llm = in_llm_offline_llm(next_model, llava_next.ARCHITECTURE, SERVER_SPEC, 8192)
    yield llm
    shutdown(llm)


def _prompt(question: str, num_images: int) -> str:
    return "USER: " + "<image>\n" * num_images + f"{question} ASSISTANT:"


def _cases():
    """Three one-image prompts of different sizes and one with two images."""
    pairs = list(sv.iter_questions(sv.HELDOUT_SEED, 5, start=7600))
    cases = [([img.resize(SIZES[i])], qa.question) for i, (img, qa) in enumerate(pairs[:3])]
    cases.append(([pairs[3][0].resize(SIZES[3]), pairs[4][0].resize(SIZES[1])],
                  pairs[3][1].question))
    return cases


def _request(images, question, spec):
    req = {"prompt": _prompt(question, len(images)), "multi_modal_data": {"image": images}}
    if spec is not None:
        req["mm_processor_kwargs"] = {"vtprune": spec}
    return req


def _reference(reference, images, question, spec, steps=DECODE_TOKENS):
    """Greedy ids of the reference loop (EOS not stopping it), the first token's
    log-probabilities, and each image's token count."""
    pruned, ids, feats = reference.prompt_inputs(_prompt(question, len(images)), images, spec)
    counts = [p.tokens.shape[0] for p in pruned]
    decoder = reference.decoder()
    plan = (reference.llm_plan(ids, counts, spec, decoder.num_layers,
                               [p.num_patches for p in pruned]) if spec else None)
    from vllm_vtprune import llm_loop

    logits, cache = decoder.prefill(reference.prompt_embeds(ids, feats), plan or llm_loop.Plan())
    first = torch.log_softmax(logits, dim=-1)
    embed = reference.model.get_input_embeddings()
    out = []
    for _ in range(steps):
        out.append(int(torch.argmax(logits)))
        if len(out) < steps:
            with torch.no_grad():
                logits = decoder.decode(embed(torch.tensor([out[-1]]))[0],
                                        len(ids) + len(out) - 1, cache, plan)
    return out, first, counts


def _full(spec: str, rcp_checkpoint: str) -> str:
    return f"{spec},ckpt={rcp_checkpoint}" if spec.startswith("rcp:") else spec


def test_the_family_serves_the_methods_inside_the_llm():
    from vllm_vtprune import families

    served = families.served_methods(families.for_architecture(llava_next.ARCHITECTURE))
    assert {"fastv", "rcp", "polymorphic"} <= set(served)


@pytest.mark.parametrize("spec", SPECS)
def test_answers_are_the_reference_loops_in_a_mixed_batch(llm, reference, rcp_checkpoint,
                                                          spec):
    from vllm import SamplingParams

    spec = _full(spec, rcp_checkpoint)
    cases = _cases()
    other = _full("rcp:32" if spec.startswith("fastv") else "fastv:32", rcp_checkpoint)
    extra = [_request(*cases[0], other), _request(*cases[1], "resprune:48"),
             _request(*cases[2], "none"), {"prompt": "USER: hello ASSISTANT:"}]
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True,
                            logprobs=1)
    outs = llm.generate([_request(*c, spec) for c in cases] + extra, params, use_tqdm=False)
    parsed = spec_mod.parse(spec)
    moved = 0
    for (images, question), out in zip(cases, outs):
        with decision_margins(parsed.method) as margins:
            expected, logprobs, counts = _reference(reference, images, question, parsed)
        # every image arrives whole, its newlines too (the decoder prunes), or as
        # Polymorphic's stage 1 merged its patches
        layouts = [llava_next.layout_of(reference.model.config, im.size[::-1]) for im in images]
        assert counts == [pipeline.kept_tokens(parsed, lay.num_tokens, lay.num_patches)
                          for lay in layouts]
        assert len(out.prompt_token_ids) == len(reference.tokenizer(
            _prompt(question, len(images))).input_ids) - len(images) + sum(counts)
        assert min(margins, default=1.0) > DECISION_MARGIN, (spec, question, margins)
        served = out.outputs[0]
        assert list(served.token_ids) == expected, (spec, question)
        first = served.token_ids[0]
        lp = served.logprobs[0][first].logprob
        assert abs(lp - float(logprobs[first])) < LOGPROB_TOLERANCE, (spec, question)
        unpruned = _reference(reference, images, question, None, steps=1)[1][first]
        moved += abs(lp - float(unpruned)) > 1e-3
    assert moved >= 1, f"{spec} changed no request's first-token log-probability"
