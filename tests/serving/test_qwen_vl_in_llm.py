"""FastV, RCP and Polymorphic inside Qwen2-VL's and Qwen2.5-VL's decoder through real vLLM (CPU), on the
small random checkpoints the project builds: the masked decoder and per-request plans of
LLaVA-1.5 on a decoder with M-RoPE, where a kept row keeps its own (t, h, w) when the
pruned rows leave the batch. Every generated token's log-probability equals the
transformers reference loop's (pruned rows removed, teacher-forced on vLLM's tokens), in
batches that mix specs, images of different sizes and two images per prompt."""
from __future__ import annotations

import pytest
import torch

from tests.reference import DECISION_MARGIN, decision_margins
from tests.serving.conftest import in_llm_offline_llm, shutdown
from tests.serving.test_qwen_vl import ATOL, FAMILIES, _prompt, _requests
from vllm_vtprune import cli, families, llm_loop
from vllm_vtprune import spec as spec_mod

SERVER_SPEC = "fastv:0.25"
SPECS = ["fastv:0.25", "fastv:8", "rcp:0.25", "rcp:8", "polymorphic:0.25", "polymorphic:8"]
MAX_TOKENS = 3


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    from transformers import AutoConfig

    from vllm_vtprune.embedded.build import build

    path = str(build(request.param, tmp_path_factory.mktemp(request.param) / "model"))
    ckpt = str(tmp_path_factory.mktemp("rcp") / "rcp.safetensors")
    assert cli.main(["rcp-init", path, "--out", ckpt]) == 0
    return families.for_config(AutoConfig.from_pretrained(path)), path, ckpt


@pytest.fixture(scope="module")
def llm(family_model):
    family, path, _ = family_model
    llm = in_llm_offline_llm(path, family.architecture, SERVER_SPEC, 4096)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def reference(family_model):
    from vllm_vtprune.hf import HfReference

    return HfReference.load(family_model[1])


def _request(images, question, spec):
    req = {"prompt": _prompt(len(images), question), "multi_modal_data": {"image": images}}
    if spec is not None:
        req["mm_processor_kwargs"] = {"vtprune": spec}
    return req


def _reference_logprobs(reference, images, question, spec, tokens):
    """The reference loop's log-probability of each of ``tokens`` (teacher-forced), and
    each image's token count."""
    pruned, ids, feats = reference.prompt_inputs(_prompt(len(images), question), images, spec)
    positions = reference.positions(ids, pruned)
    counts = [p.tokens.shape[0] for p in pruned]
    decoder = reference.decoder()
    plan = (reference.llm_plan(ids, counts, spec, decoder.num_layers,
                               [p.num_patches for p in pruned]) if spec else None)
    logits, cache = decoder.prefill(reference.prompt_embeds(ids, feats),
                                    plan or llm_loop.Plan(), positions=positions)
    embed = reference.model.get_input_embeddings()
    out = []
    for k, token in enumerate(tokens):
        out.append(float(torch.log_softmax(logits.float(), dim=-1)[token]))
        if k + 1 < len(tokens):
            with torch.no_grad():
                logits = decoder.decode(embed(torch.tensor([token]))[0],
                                        positions[:, -1] + k + 1, cache, plan)
    return out, counts


def test_the_families_serve_the_methods_inside_the_llm(family_model):
    assert {"fastv", "rcp", "polymorphic"} <= set(families.served_methods(family_model[0]))


@pytest.mark.parametrize("spec", SPECS)
def test_logprobs_are_the_reference_loops_in_a_mixed_batch(family_model, llm, reference,
                                                           spec):
    from vllm import SamplingParams

    if spec.startswith("rcp:"):
        spec = f"{spec},ckpt={family_model[2]}"
    cases = _requests()
    extra = [_request(*cases[0], "resprune:0.25"), _request(*cases[1], "none"),
             {"prompt": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"}]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=1,
                            ignore_eos=True)
    outs = llm.generate([_request(*c, spec) for c in cases] + extra, params, use_tqdm=False)
    parsed = spec_mod.parse(spec)
    moved = decided = 0
    for (images, question), out in zip(cases, outs):
        tokens = list(out.outputs[0].token_ids)
        served = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]
        with decision_margins(parsed.method) as margins:
            expected, counts = _reference_logprobs(reference, images, question, parsed, tokens)
        assert len(out.prompt_token_ids) == len(reference.tokenizer(
            _prompt(len(images), question)).input_ids) - len(images) + sum(counts)
        # compared where every kept set is decided, not tied: vLLM's floats (another
        # CPU's too) cannot flip those. The random towers attend almost uniformly, so
        # Polymorphic's many choices (stage 1's top-k and density peaks, stage 2 at three
        # layers) meet a near-tie on some prompts
        if min(margins, default=1.0) <= DECISION_MARGIN:
            continue
        decided += 1
        assert max(abs(a - b) for a, b in zip(served, expected)) < ATOL, (spec, question)
        unpruned, _ = _reference_logprobs(reference, images, question, None, tokens[:1])
        moved += abs(served[0] - unpruned[0]) > 1e-3
    assert decided >= len(cases) - 1, f"{spec}: {decided} of {len(cases)} decided"
    assert moved >= 1, f"{spec} changed no request's first-token log-probability"
