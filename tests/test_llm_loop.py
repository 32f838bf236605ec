"""The explicit decoder loop (in-LLM pruning reference) on the embedded checkpoint."""
from __future__ import annotations

import pytest
import torch

from vllm_vtprune import llm_loop, spec as spec_mod
from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded import SMALL_MODEL, model_path

from tests.reference import DECISION_MARGIN, decision_margins


@pytest.fixture(scope="module")
def reference():
    from vllm_vtprune.hf import HfReference

    return HfReference.load(model_path(SMALL_MODEL))


@pytest.fixture(scope="module")
def prompt(reference):
    """Embeddings of a two-image prompt with all 576 tokens per image, and image spans."""
    from vllm_vtprune.hf import _expand

    pairs = list(sv.iter_questions(sv.HELDOUT_SEED, 2, start=9100))
    text = "USER: <image>\n<image>\nis there a red circle ? ASSISTANT:"
    ids = reference.tokenizer(text).input_ids
    pruned = reference.image_tokens(reference.pixel_values([p[0] for p in pairs]), None, ids)
    full = _expand(ids, reference.image_token_id, [576, 576])
    embeds = reference.prompt_embeds(full, torch.cat([p.tokens for p in pruned]))
    spans = llm_loop.spans_of(torch.tensor(full) == reference.image_token_id, [576, 576])
    assert spans == [(3, 579), (579, 1155)]  # adjacent images, one span each
    return embeds, spans


def _decoder(reference):
    return llm_loop.PrunedDecoder(reference.model.model.language_model, reference.model.lm_head)


def _greedy(decoder, embeds, plan, mode, steps, reference, forced=None):
    """Greedy tokens and the logits of every step; ``forced`` tokens replace the argmax
    (so two paths are compared on the same sequence, whatever a near-tie does)."""
    logits, cache = decoder.prefill(embeds, plan, mode)
    out, all_logits = [], [logits]
    pos = embeds.shape[0]
    for step in range(steps):
        tok = int(torch.argmax(logits)) if forced is None else forced[step]
        out.append(tok)
        with torch.no_grad():
            emb = reference.model.get_input_embeddings()(torch.tensor([tok]))[0]
        logits = decoder.decode(emb, pos, cache)
        all_logits.append(logits)
        pos += 1
    return out, torch.stack(all_logits)


def test_without_pruning_the_loop_is_the_transformers_model(reference, prompt):
    embeds, _ = prompt
    ours, logits = _greedy(_decoder(reference), embeds, llm_loop.Plan(), "remove", 6, reference)
    # transformers' own forward over the growing sequence, one full pass per token
    seq = embeds
    for step, tok in enumerate(ours):
        with torch.no_grad():
            hidden = reference.model.model.language_model(inputs_embeds=seq[None]).last_hidden_state
            ref = reference.model.lm_head(hidden[0, -1])
        torch.testing.assert_close(logits[step], ref, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            nxt = reference.model.get_input_embeddings()(torch.tensor([tok]))
        seq = torch.cat([seq, nxt])


def _fastv_plan(spans, budget=64, layer=2):
    from vllm_vtprune.methods import fastv

    spec = spec_mod.parse(f"fastv:{budget},layer={layer}")
    return fastv.llm_plan(spec, spans, 8, 576)


def test_removing_pruned_rows_equals_masking_them(reference, prompt):
    """Physical removal (the reference) and key masking (what vLLM can do) agree on every
    kept token, in prefill and in 8 decode steps."""
    embeds, spans = prompt
    dec = _decoder(reference)
    with decision_margins("fastv") as margins:  # a choice no rounding can flip
        out_r, logits_r = _greedy(dec, embeds, _fastv_plan(spans), "remove", 8, reference)
    assert min(margins) > DECISION_MARGIN, margins
    _, logits_m = _greedy(dec, embeds, _fastv_plan(spans), "mask", 8, reference, out_r)
    torch.testing.assert_close(logits_r, logits_m, rtol=1e-4, atol=1e-4)
    unpruned = dec.prefill(embeds, llm_loop.Plan())[0]
    assert (unpruned - logits_r[0]).abs().max() > 1e-3  # pruning changed the computation


def test_fastv_keeps_the_most_attended_image_tokens_of_layer_k_minus_1(reference, prompt):
    """Independent check: transformers' eager attention weights of layer 1, last prompt
    row, head mean, top 64 of each image; the loop's deeper layers hold those and text."""
    embeds, spans = prompt
    lm = reference.model.model.language_model
    old = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            attn = lm(inputs_embeds=embeds[None], output_attentions=True).attentions[1][0]
    finally:
        lm.config._attn_implementation = old
    row = attn[:, -1].mean(0)
    expected = set(range(embeds.shape[0]))
    for start, end in spans:
        ranked = torch.sort(row[start:end], descending=True, stable=True)
        top = ranked.indices[:64]
        # the 64th and 65th must differ by more than the two attention paths' rounding
        assert (ranked.values[63] - ranked.values[64]) / ranked.values[63] > 1e-4
        expected -= set(range(start, end)) - set((top + start).tolist())
    _, cache = _decoder(reference).prefill(embeds, _fastv_plan(spans))
    n = embeds.shape[0]
    assert [kv.keys.shape[1] for kv in cache] == [n, n] + [n - 2 * (576 - 64)] * 6
    assert set(cache[2].rows.tolist()) == expected
    assert all(torch.equal(kv.rows, cache[2].rows) for kv in cache[2:])  # cumulative
    _, masked = _decoder(reference).prefill(embeds, _fastv_plan(spans), "mask")
    assert set(torch.nonzero(masked[2].alive).flatten().tolist()) == expected


def test_fastv_decision_layer_scales_with_depth_and_is_checked():
    from vllm_vtprune.methods import fastv

    assert fastv.decision_layer(None, 32) == 2 and fastv.decision_layer(None, 8) == 1
    assert fastv.decision_layer(None, 48) == 3 and fastv.decision_layer(3, 8) == 3
    with pytest.raises(ValueError, match="layer=8 is outside.*1 to 7"):
        fastv.decision_layer(8, 8)


def test_spans_of_cuts_image_tokens_by_each_images_count():
    mask = torch.tensor([0, 1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)  # adjacent images
    assert llm_loop.spans_of(mask, [2, 2, 2]) == [(1, 3), (3, 5), (6, 8)]
    assert llm_loop.spans_of(mask, [4, 2]) == [(1, 5), (6, 8)]
    assert llm_loop.spans_of(torch.tensor([1, 2]) == 4, []) == []
    with pytest.raises(ValueError, match="6 image tokens for images of"):
        llm_loop.spans_of(mask, [4, 4])


def test_reference_generate_with_fastv_budget_above_count_is_unpruned(reference):
    pairs = list(sv.iter_questions(sv.HELDOUT_SEED, 4, start=9200))
    from vllm_vtprune.hf import _expand

    for image, qa in pairs:
        prompt = f"USER: <image>\n{qa.question} ASSISTANT:"
        ids = reference.tokenizer(prompt).input_ids
        feats = reference.image_tokens(reference.pixel_values([image]), None, ids)[0].tokens
        with torch.no_grad():
            top = torch.topk(reference._last_logits(_expand(ids, reference.image_token_id,
                                                            [576]), feats), 2).values
        # two float paths agree on the answer only where its logit margin exceeds their
        # rounding (~1e-5 here)
        assert top[0] - top[1] > 1e-2, (qa.question, top)
        vanilla, _ = reference.generate(prompt, [image], None)
        assert reference.generate(prompt, [image], spec_mod.parse("fastv:1000"))[0] == vanilla



def _single_image(reference, start=9300):
    """Expanded ids, embeddings and counts of a one-image prompt pruned by ``spec``'s
    encoder stage (none: every token)."""
    from vllm_vtprune.hf import _expand

    image, qa = next(iter(sv.iter_questions(sv.HELDOUT_SEED, 1, start=start)))
    prompt_ids = reference.tokenizer(f"USER: <image>\n{qa.question} ASSISTANT:").input_ids

    def build(spec):
        pruned = reference.image_tokens(reference.pixel_values([image]), spec, prompt_ids)
        counts = [p.tokens.shape[0] for p in pruned]
        ids = _expand(prompt_ids, reference.image_token_id, counts)
        return ids, reference.prompt_embeds(ids, pruned[0].tokens), counts

    return build


@pytest.mark.parametrize("spec", ["polymorphic:64", "polymorphic:16", "rcp:64", "rcp:16"])
def test_multi_layer_plans_remove_equals_mask(reference, rcp_checkpoint, spec):
    """Polymorphic's three stage-2 decisions (with merging) and RCP's three pruners and
    two adapters: removal and masking agree on every kept token, prefill and 8 steps."""
    if spec.startswith("rcp"):
        spec += f",ckpt={rcp_checkpoint}"
    parsed = spec_mod.parse(spec)
    ids, embeds, counts = _single_image(reference)(parsed)
    dec = _decoder(reference)
    with decision_margins(parsed.method) as margins:  # a choice no rounding can flip
        out_r, logits_r = _greedy(dec, embeds, reference.llm_plan(ids, counts, parsed, 8),
                                  "remove", 8, reference)
    assert min(margins) > DECISION_MARGIN, margins
    _, logits_m = _greedy(dec, embeds, reference.llm_plan(ids, counts, parsed, 8), "mask", 8,
                          reference, out_r)
    torch.testing.assert_close(logits_r, logits_m, rtol=1e-4, atol=1e-4)
    _, cache = dec.prefill(embeds, reference.llm_plan(ids, counts, parsed, 8))
    sizes = [kv.keys.shape[1] for kv in cache]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]  # cumulative


def test_polymorphic_stage2_keeps_the_rater_scores_top_tokens(reference):
    """Independent check of the first stage-2 decision (layer 1 of 8): Eqs. 9-11 written
    out in float64 over transformers' own hidden states entering layer 1 (unit RMS), the image's
    stage-1 tokens against the text after it; the loop's layer-1 rows are the top-k."""
    from vllm_vtprune.methods import polymorphic

    parsed = spec_mod.parse("polymorphic:64")
    ids, embeds, counts = _single_image(reference)(parsed)
    lm = reference.model.model.language_model
    with torch.no_grad():
        x = lm(inputs_embeds=embeds[None], output_hidden_states=True).hidden_states[1][0]
    x = x.double()
    x = x / (x.pow(2).mean(dim=-1, keepdim=True) + 1e-6).sqrt()  # unit RMS per token
    start = ids.index(reference.image_token_id)
    end = start + counts[0]
    v, t = x[start:end], x[end:]
    d = v.shape[1]
    m = torch.zeros(len(v), len(t), dtype=torch.float64)
    for i in range(len(v)):
        e = torch.tensor([float(torch.exp(v[i] @ t[j] / d ** 0.5)) for j in range(len(t))],
                         dtype=torch.float64)
        m[i] = e / e.sum()
    s = m.mean(0)
    raters = s > s.mean()
    alpha = m[:, raters].mean(1)
    keep = polymorphic.stage2_schedule(counts[0], 64, polymorphic.stage2_layers(8), 8)[0]
    ranked = torch.sort(alpha, descending=True, stable=True)
    assert (ranked.values[keep - 1] - ranked.values[keep]) / ranked.values[keep - 1] > 1e-4
    expected = set((ranked.indices[:keep] + start).tolist())
    _, cache = _decoder(reference).prefill(embeds, reference.llm_plan(ids, counts, parsed, 8))
    layer1 = set(cache[1].rows.tolist())
    assert layer1 & set(range(start, end)) == expected
    assert set(range(len(ids))) - set(range(start, end)) <= layer1  # text stays


def test_rcp_identity_adapters_change_nothing_and_trained_ones_act_on_answers(
        reference, rcp_checkpoint):
    from vllm_vtprune.methods import rcp

    parsed = spec_mod.parse(f"rcp:64,ckpt={rcp_checkpoint}")
    ids, embeds, counts = _single_image(reference)(parsed)
    dec = _decoder(reference)
    plan = reference.llm_plan(ids, counts, parsed, 8)
    with_adapters = dec.prefill(embeds, plan)[0]
    plan = reference.llm_plan(ids, counts, parsed, 8)
    plan.adapters = {}
    assert torch.equal(dec.prefill(embeds, plan)[0], with_adapters)
    modules = rcp.modules_for(parsed)
    layer = max(modules.adapters)
    up = modules.adapters[layer].up
    try:
        with torch.no_grad():
            up.weight.normal_(0, 0.05)
        moved = dec.prefill(embeds, reference.llm_plan(ids, counts, parsed, 8))[0]
    finally:
        with torch.no_grad():
            up.weight.zero_()
    assert (moved - with_adapters).abs().max() > 1e-3
