"""Pruning inside the LLM through real vLLM (CPU): the plugin's decoder loop and masked
attention against the transformers reference loop, which removes the pruned rows
(vllm_vtprune.llm_loop), with per-request specs of different methods batched together."""
from __future__ import annotations

import os

import pytest
import torch

from vllm_vtprune import llm_loop
from vllm_vtprune import spec as spec_mod
from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded import SMALL_MODEL, model_path
from vllm_vtprune.families.llava import ARCHITECTURE

from tests.reference import DECISION_MARGIN, decision_margins

SPEC = "fastv:64"  # the server's spec: it installs the masked decoder for every request
PAIRS = list(sv.iter_questions(sv.HELDOUT_SEED, 8, start=7300))
# log-probabilities of the two paths differ by ~1e-6 (fp32); a wrong mask moves them
# by more than 1e-3 on most questions (measured: 5 of 6 by over 4e-4)
LOGPROB_TOLERANCE = 1e-4
IN_LLM_SPECS = ["fastv:64", "fastv:32", "polymorphic:64", "polymorphic:32", "rcp:64", "rcp:32"]
DECODE_TOKENS = 16


def _prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def _llm(**kwargs):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    return LLM(model=model_path(SMALL_MODEL), enforce_eager=True, max_model_len=2048, dtype="float32",
               limit_mm_per_prompt={"image": 2},
               hf_overrides={"architectures": [ARCHITECTURE], "vtprune": SPEC}, **kwargs)


@pytest.fixture(scope="module")
def fastv_llm():
    import gc

    llm = _llm(enable_chunked_prefill=False, enable_prefix_caching=False)
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _requests(pairs, spec: str | None = None):
    reqs = []
    for image, qa in pairs:
        req = {"prompt": _prompt(qa.question), "multi_modal_data": {"image": image}}
        if spec is not None:
            req["mm_processor_kwargs"] = {"vtprune": spec}
        reqs.append(req)
    return reqs


# the 64th and 65th FastV scores of every image must differ by more than the two float
# paths' rounding (~1e-6 relative), or an exact comparison of the kept sets means nothing
SCORE_MARGIN = 1e-4


def _reference_logprobs(reference, image, question: str, spec):
    """Log-softmax of the loop's first-token logits, pruned as ``spec`` says (None: not),
    and the relative gap between the last kept and the first dropped FastV score."""
    from vllm_vtprune.hf import _expand
    from vllm_vtprune.methods import fastv

    ids = _expand(reference.tokenizer(_prompt(question)).input_ids, reference.image_token_id,
                  [576])
    pruned = reference.image_tokens(reference.pixel_values([image]), None, ids)
    embeds = reference.prompt_embeds(ids, pruned[0].tokens)
    decoder = reference.decoder()
    if spec is None:
        return torch.log_softmax(decoder.prefill(embeds, llm_loop.Plan())[0], dim=-1), None
    spans = llm_loop.spans_of(torch.tensor(ids) == reference.image_token_id, [576])
    gaps = []
    plan = fastv.llm_plan(spec, spans, decoder.num_layers, 576)
    plan.decisions = {layer: _recording(decide, spans, spec.tokens_for(576), gaps)
                      for layer, decide in plan.decisions.items()}
    logits = decoder.prefill(embeds, plan)[0]
    return torch.log_softmax(logits, dim=-1), min(gaps)


def _recording(decide, spans, keep, gaps):
    def wrapped(view):
        for start, end in spans:
            scores = view.probs[:, -1, (view.rows >= start) & (view.rows < end)].mean(0)
            ranked = torch.sort(scores, descending=True).values
            gaps.append(float((ranked[keep - 1] - ranked[keep]) / ranked[keep - 1]))
        return decide(view)

    return wrapped


def test_first_token_logprobs_are_the_reference_loops_in_a_mixed_batch(fastv_llm, reference):
    from vllm import SamplingParams

    reqs = _requests(PAIRS) + [{"prompt": "USER: hello ASSISTANT:"}]
    outs = fastv_llm.generate(reqs, SamplingParams(temperature=0, max_tokens=1, logprobs=1),
                              use_tqdm=False)
    moved = 0
    for (image, qa), out in zip(PAIRS, outs):
        token = out.outputs[0].token_ids[0]
        served = out.outputs[0].logprobs[0][token].logprob
        logprobs, gap = _reference_logprobs(reference, image, qa.question, spec_mod.parse(SPEC))
        assert gap > SCORE_MARGIN, (qa.question, gap)
        pruned = logprobs[token]
        full = _reference_logprobs(reference, image, qa.question, None)[0][token]
        assert abs(served - float(pruned)) < LOGPROB_TOLERANCE, (qa.question, served, pruned)
        moved += abs(served - float(full)) > 1e-3
    assert moved >= len(PAIRS) // 2, "the masks changed almost nothing"


def _full(spec: str, rcp_checkpoint: str) -> str:
    """RCP with untrained modules (`vtprune rcp-init`)."""
    return f"{spec},ckpt={rcp_checkpoint}" if spec.startswith("rcp:") else spec


@pytest.mark.parametrize("spec", IN_LLM_SPECS)
def test_mixed_batch_equals_reference_alone_and_batched(fastv_llm, reference, rcp_checkpoint,
                                                         spec):
    """Three requests under ``spec`` batched with requests under another in-LLM method,
    an encoder-side method, no pruning and no image: each answer (16 decode tokens)
    equals the transformers reference loop's, and the same request sent alone."""
    from vllm import SamplingParams

    spec = _full(spec, rcp_checkpoint)
    mine, others = PAIRS[:3], PAIRS[3:6]
    other_in_llm = _full("rcp:48" if not spec.startswith("rcp") else "polymorphic:48",
                         rcp_checkpoint)
    reqs = (_requests(mine, spec) + _requests(others[:1], other_in_llm)
            + _requests(others[1:2], "resprune:64") + _requests(others[2:3], "none")
            + [{"prompt": "USER: hello ASSISTANT:"}])
    params = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True,
                            logprobs=1)
    batched = [o.outputs[0] for o in fastv_llm.generate(reqs, params, use_tqdm=False)]
    alone = [fastv_llm.generate(r, params, use_tqdm=False)[0].outputs[0].token_ids
             for r in reqs[:len(mine)]]
    assert alone == [o.token_ids for o in batched[:len(mine)]]
    from vllm_vtprune.embedded import with_shipped_modules

    parsed = with_shipped_modules(spec_mod.parse(spec), reference.model.config)
    moved = 0
    for (image, qa), served in zip(mine, batched):
        with decision_margins(parsed.method) as margins:
            expected, logprobs = _reference_tokens(reference, image, qa.question, parsed,
                                                   DECODE_TOKENS)
        # the kept sets are decided, not tied: vLLM's floats (another CPU's too, ~1e-6)
        # cannot flip a choice made by more than this
        assert min(margins, default=1.0) > DECISION_MARGIN, (spec, qa.question, margins)
        assert list(served.token_ids) == expected, (spec, qa.question)
        first = served.token_ids[0]
        lp = served.logprobs[0][first].logprob
        assert abs(lp - float(logprobs[first])) < LOGPROB_TOLERANCE, (spec, qa.question)
        full = _reference_logprobs(reference, image, qa.question, None)[0][first]
        moved += abs(lp - float(full)) > 1e-3
    assert moved >= 1, f"{spec} changed no request's first-token log-probability"


@pytest.mark.parametrize("spec", ["fastv:64", "polymorphic:64"])
def test_two_images_in_one_prompt_are_pruned_each_as_the_reference_does(fastv_llm, reference,
                                                                          spec):
    from vllm import SamplingParams

    (im1, qa), (im2, _) = PAIRS[6], PAIRS[7]
    question = f"<image>\n{qa.question}"  # the prompt's first image comes from _prompt
    req = {"prompt": _prompt(question), "multi_modal_data": {"image": [im1, im2]},
           "mm_processor_kwargs": {"vtprune": spec}}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    out = fastv_llm.generate(req, params, use_tqdm=False)[0].outputs[0]
    with decision_margins(spec.split(":")[0]) as margins:
        expected, logprobs = _reference_tokens(reference, [im1, im2], question,
                                               spec_mod.parse(spec), 8)
    assert min(margins) > DECISION_MARGIN, margins
    assert list(out.token_ids) == expected
    first = out.token_ids[0]
    assert abs(out.logprobs[0][first].logprob - float(logprobs[first])) < LOGPROB_TOLERANCE


def _reference_tokens(reference, image, question, spec, steps):
    """Greedy token ids of the reference loop (removal), EOS not stopping it, and the
    first token's log-probabilities."""
    from vllm_vtprune.hf import _expand

    prompt_ids = reference.tokenizer(_prompt(question)).input_ids
    images = image if isinstance(image, list) else [image]
    pruned = reference.image_tokens(reference.pixel_values(images), spec, prompt_ids)
    counts = [p.tokens.shape[0] for p in pruned]
    ids = _expand(prompt_ids, reference.image_token_id, counts)
    decoder = reference.decoder()
    plan = reference.llm_plan(ids, counts, spec, decoder.num_layers)
    feats = torch.cat([p.tokens for p in pruned])
    logits, cache = decoder.prefill(reference.prompt_embeds(ids, feats), plan)
    first = torch.log_softmax(logits, dim=-1)
    out = []
    embed = reference.model.get_input_embeddings()
    for _ in range(steps):
        out.append(int(torch.argmax(logits)))
        if len(out) == steps:
            break
        with torch.no_grad():
            logits = decoder.decode(embed(torch.tensor([out[-1]]))[0], len(ids) + len(out) - 1,
                                    cache, plan)
    return out, first


def test_a_preempted_request_is_decided_again_as_before(reference, tmp_path, monkeypatch):
    """A KV cache for two prompts at a time: a third request preempts one, which vLLM
    recomputes with its output so far. Every decision taken, first ones and recomputed
    ones, keeps the set the reference loop keeps for that request (FastV's last prompt
    token, not the last generated one), and the answers are those sent alone."""
    import gc
    import json

    from vllm import LLM, SamplingParams

    from vllm_vtprune.models import in_llm

    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("VTPRUNE_TRACE", str(trace))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = LLM(model=model_path(SMALL_MODEL), enforce_eager=True, max_model_len=1024, dtype="float32",
              hf_overrides={"architectures": [ARCHITECTURE], "vtprune": "fastv:32"},
              enable_chunked_prefill=False, enable_prefix_caching=False,
              num_gpu_blocks_override=39, block_size=32)  # 1248 tokens; a prompt ~590
    try:
        before = in_llm.STEP.recomputed
        pairs = PAIRS[:4]
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        batched = [o.outputs[0].token_ids
                   for o in llm.generate(_requests(pairs), params, use_tqdm=False)]
        assert in_llm.STEP.recomputed > before, "no request was preempted"
        alone = [llm.generate(r, params, use_tqdm=False)[0].outputs[0].token_ids
                 for r in _requests(pairs)]
        assert alone == batched
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    expected = []
    for image, qa in pairs:
        ids = reference.tokenizer(_prompt(qa.question)).input_ids
        spec = spec_mod.parse("fastv:32")
        from vllm_vtprune.hf import _expand

        full = _expand(ids, reference.image_token_id, [576])
        pruned = reference.image_tokens(reference.pixel_values([image]), spec, ids)
        embeds = reference.prompt_embeds(full, pruned[0].tokens)
        plan = reference.llm_plan(full, [576], spec, 8)
        cache = reference.decoder().prefill(embeds, plan)[1]
        expected.append(cache[1].rows.tolist())
        gap = _reference_logprobs(reference, image, qa.question, spec)[1]
        assert gap > SCORE_MARGIN, (qa.question, gap)  # the kept set is decided, not tied
    records = [json.loads(line) for line in trace.read_text().splitlines()
               if '"in_llm"' in line]
    assert sum(r["recomputed"] for r in records) >= 1
    for r in records:
        assert r["kept"] in expected, (r["recomputed"], r["prompt_len"])


def test_vllm_serve_with_fastv_answers_per_request_specs_and_refuses_bad_ones(tmp_path):
    """`vllm serve EMBEDDED --vtprune fastv:64`: the flag turns off chunked prefill, the
    prefix cache and compilation itself; nothing is physically saved, and the figures
    say so; a request may ask for another method (Polymorphic here, whose stage 1 does
    save KV); a spec that cannot run on this decoder gets a 400 and the server goes on."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import openai
    from openai import OpenAI

    from .conftest import _wait_healthy, chat_messages, free_port

    port, log = free_port(), tmp_path / "serve.log"
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", model_path(SMALL_MODEL), "--vtprune", SPEC,
           "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"),
                                start_new_session=True)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        image, qa = PAIRS[0]
        r = client.chat.completions.create(model="m", messages=chat_messages(qa.question, [image]),
                                           max_tokens=3, temperature=0)
        fig = r.usage.vtprune
        assert fig["method"] == "fastv" and fig["visual_tokens_after"] == 576
        assert fig["kv_cache_tokens_saved"] == 0
        assert fig["inside_llm"]["token_layers_skipped"] == 7 * (576 - 64)  # K=1 of 8
        r = client.chat.completions.create(
            model="m", messages=chat_messages(qa.question, [image]), max_tokens=3,
            temperature=0, extra_body={"mm_processor_kwargs": {"vtprune": "polymorphic:32"}})
        fig = r.usage.vtprune
        assert fig["method"] == "polymorphic" and fig["visual_tokens_after"] == 64
        assert fig["kv_cache_tokens_saved"] == 576 - 64 and fig["inside_llm"]
        for bad, says in (("fastv:64,layer=8", "1 to 7"), ("rcp:64", "ckpt=PATH")):
            with pytest.raises(openai.BadRequestError, match=says):
                client.chat.completions.create(
                    model="m", messages=chat_messages(qa.question, [image]), max_tokens=1,
                    extra_body={"mm_processor_kwargs": {"vtprune": bad}})
        r = client.chat.completions.create(model="m", messages=chat_messages(qa.question, [image]),
                                           max_tokens=3, temperature=0)
        assert r.choices[0].message.content
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
