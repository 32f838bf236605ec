"""The transformers reference path on Qwen2-VL / Qwen2.5-VL checkpoints the project
builds: unpruned, it is transformers' own model (image features, positions, greedy
answer); pruned, it keeps exactly the budget."""
from __future__ import annotations

import pytest
import torch

from vllm_vtprune import spec as spec_mod
from vllm_vtprune.data import shapes_vqa as sv

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
          "what color is the square ?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request, tmp_path_factory):
    from vllm_vtprune.embedded.build import build
    from vllm_vtprune.hf import HfReference

    path = build(request.param, tmp_path_factory.mktemp(request.param) / "model")
    return HfReference.load(str(path))


def _image(size=(336, 252)):
    return sv.make_sample(2, 3).image.resize(size)


def test_unpruned_tokens_are_transformers_image_features(reference):
    image = _image()
    inputs = reference.processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = reference.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        expected = getattr(expected, "pooler_output", expected)
        expected = torch.cat(list(expected)) if isinstance(expected, (list, tuple)) else expected
    pruned = reference.image_tokens(reference.pixel_values([image]), None, [])
    torch.testing.assert_close(pruned[0].tokens, expected, rtol=1e-4, atol=1e-4)


def test_unpruned_answer_and_positions_are_transformers_own(reference):
    from vllm_vtprune.hf import _expand

    image = _image((280, 420))
    inputs = reference.processor(text=[PROMPT], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = reference.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected, _ = reference.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    answer, pruned = reference.generate(PROMPT, [image], None)
    assert answer == reference.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                                skip_special_tokens=True)
    ids = _expand(reference.tokenizer(PROMPT).input_ids, reference.image_token_id,
                  [pruned[0].tokens.shape[0]])
    assert torch.equal(reference.positions(ids, pruned), expected[:, 0])


@pytest.mark.parametrize("spec", ["resprune:0.25", "divprune:16", "random:0.5", "resprune:1000",
                                  "dcp:0.25", "dcp:5,delta=0"])
def test_pruned_images_keep_the_budget(reference, spec):
    parsed = spec_mod.parse(spec)
    image = _image()
    full = reference.image_tokens(reference.pixel_values([image]), None, [])[0].tokens.shape[0]
    _, pruned = reference.generate(PROMPT, [image], parsed, max_new_tokens=1)
    assert pruned[0].tokens.shape[0] == parsed.tokens_for(full)
    assert torch.equal(pruned[0].origins, torch.sort(pruned[0].origins).values)


def _loop_inputs(reference, image, spec=None):
    from vllm_vtprune.hf import _expand

    pruned = reference.image_tokens(reference.pixel_values([image]), spec, [])
    ids = _expand(reference.tokenizer(PROMPT).input_ids, reference.image_token_id,
                  [pruned[0].tokens.shape[0]])
    embeds = reference.prompt_embeds(ids, pruned[0].tokens)
    return ids, embeds, reference.positions(ids, pruned), pruned


def test_unpruned_loop_with_mrope_positions_is_transformers_decoder(reference):
    """The explicit loop (in-LLM reference) on M-RoPE positions: the first-token logits
    and two decode steps equal transformers' own decoder's; with the positions of plain
    text (0..T-1) they would not."""
    from vllm_vtprune import llm_loop

    ids, embeds, positions, pruned = _loop_inputs(reference, _image((280, 420)))
    feats = pruned[0].tokens
    decoder = reference.decoder()
    logits, cache = decoder.prefill(embeds, llm_loop.Plan(), positions=positions)
    want = reference.last_logits(ids, feats, positions)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    plain, _ = decoder.prefill(embeds, llm_loop.Plan())
    assert (plain - want).abs().max() > 100 * 1e-4  # the positions matter here
    embed = reference.model.get_input_embeddings()
    out = list(ids)
    for k in range(1, 3):
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        at = positions[:, -1] + k
        positions = torch.cat([positions, at[:, None]], dim=1)
        with torch.no_grad():
            logits = decoder.decode(embed(torch.tensor([nxt]))[0], at, cache)
        torch.testing.assert_close(logits, reference.last_logits(out, feats, positions),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["fastv:0.25", "fastv:8"])
def test_fastv_removing_rows_equals_masking_them_with_mrope(reference, spec):
    """Pruned rows taken out of the batch or only hidden: the same logits (each kept row
    keeps its own (t, h, w) either way)."""
    from vllm_vtprune import llm_loop

    ids, embeds, positions, pruned = _loop_inputs(reference, _image((280, 420)))
    decoder = reference.decoder()
    parsed = spec_mod.parse(spec)
    def plan():
        return reference.llm_plan(ids, [pruned[0].tokens.shape[0]], parsed,
                                  decoder.num_layers, [pruned[0].num_patches])

    removed, _ = decoder.prefill(embeds, plan(), "remove", positions=positions)
    masked, _ = decoder.prefill(embeds, plan(), "mask", positions=positions)
    torch.testing.assert_close(removed, masked, rtol=1e-4, atol=1e-4)
    full, _ = decoder.prefill(embeds, llm_loop.Plan(), positions=positions)
    assert (removed - full).abs().max() > 1e-3  # the pruning acted


def _probed(reference, image):
    tower = reference.tower
    patches, grid_thw = reference.pixel_values([image])[0]
    bound = tower.for_image(grid_thw)
    with torch.no_grad():
        bound.embed(patches)
        return bound, bound.probe(0, None), grid_thw


def test_probe_is_the_attention_the_last_block_computes(reference, monkeypatch):
    """Softmax(q k^T / sqrt(d)) of the captured queries and keys, applied to the captured
    values and projected, is the last block's attention output as transformers computes
    it; the received attention is that softmax averaged over heads and queries (chunked
    over queries, segments respected)."""
    from vllm_vtprune.families import qwen2_vl

    outputs = []
    attn = reference.model.model.visual.blocks[-1].attn
    handle = attn.register_forward_hook(lambda m, a, out: outputs.append(out))
    monkeypatch.setattr(qwen2_vl, "PROBE_CHUNK", 7)  # several chunks, a ragged last one
    try:
        bound, probe, _ = _probed(reference, _image((280, 420)))
    finally:
        handle.remove()
    last = bound._last
    q, k, v = (x.float().transpose(0, 1) for x in (last.q, last.k, last.v))  # [H, S, d]
    probs = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
    context = (probs @ v).transpose(0, 1).reshape(q.shape[1], -1)
    with torch.no_grad():
        torch.testing.assert_close(attn.proj(context), outputs[-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        qwen2_vl.received_attention(last.q, last.k, last.cu_seqlens), probs.mean(dim=(0, 1)),
        rtol=1e-5, atol=1e-7)
    per_token = probs.mean(dim=(0, 1)).view(-1, 4).mean(1)[bound._order]
    torch.testing.assert_close(probe.received, per_token, rtol=1e-5, atol=1e-7)


def test_probe_follows_the_tokens_through_the_window_reordering(reference):
    """A probe row is its output token's: the windows' place in the blocks' order, read
    back after the encoder's own reordering, is the inverse of transformers'
    ``get_window_index`` on Qwen2.5-VL and the identity on Qwen2-VL."""
    bound, probe, grid_thw = _probed(reference, _image((336, 252)))
    from transformers.vision_utils import get_vision_window_index

    visual = reference.model.model.visual
    windowed = hasattr(visual, "window_size")  # Qwen2.5-VL
    if windowed:
        window_index, _ = get_vision_window_index(
            torch.tensor([grid_thw]), spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size, patch_size=visual.patch_size)
        expected = torch.argsort(window_index)
        assert not torch.equal(expected, torch.arange(len(expected)))  # windows do reorder
    else:
        expected = torch.arange(probe.received.shape[0])
    assert torch.equal(bound._order.cpu(), expected.cpu())


def test_visionzip_without_cls_keeps_the_most_attended_tokens(reference):
    """With no contextual tokens, VisionZip keeps the tokens that receive the most
    attention (the CLS stand-in), in their order."""
    image = _image((336, 252))
    _, probe, _ = _probed(reference, image)
    _, pruned = reference.generate(PROMPT, [image], spec_mod.parse("visionzip:12,contextual=0"),
                                   max_new_tokens=1)
    ranked = torch.sort(probe.received, descending=True)
    # the 12th and 13th differ by more than two CPUs' rounding, or the choice is a tie
    assert (ranked.values[11] - ranked.values[12]) / ranked.values[11] > 1e-4
    assert pruned[0].origins.tolist() == sorted(ranked.indices[:12].tolist())


def _first_block_inputs(reference, image):
    """Block 0's input (blocks' order) and arguments, from transformers' own forward."""
    visual = reference.model.model.visual
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs, hidden=args[0])

    patches, grid_thw = reference.pixel_values([image])[0]
    handle = visual.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            reference.tower.for_image(grid_thw).embed(patches)
    finally:
        handle.remove()
    return captured, patches, grid_thw


def _window_index(visual, grid_thw):
    """transformers' window order (raster token of each slot) and window segments."""
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(torch.tensor([grid_thw]),
                                   spatial_merge_size=visual.spatial_merge_size,
                                   window_size=visual.window_size, patch_size=visual.patch_size)


def _masked_block(block, x, cos_sin, segment, keep):
    """A block on every patch ([S, C], blocks' order) with attention only within a
    segment and only to kept keys: a kept patch's outputs as if the others were absent.
    Returns the stream after attention, after the MLP, and the softmax [H, S, S]."""
    import sys

    attn, s = block.attn, x.shape[0]
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    q, k, v = attn.qkv(block.norm1(x)).reshape(s, 3, attn.num_heads, -1).permute(
        1, 0, 2, 3).unbind(0)
    q, k = rotate(q, k, *cos_sin)
    q, k, v = (t.transpose(0, 1).float() for t in (q, k, v))
    allowed = (segment[:, None] == segment[None, :]) & keep[None, :]
    scores = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    x_att = x + attn.proj((probs @ v).transpose(0, 1).reshape(s, -1))
    return x_att, x_att + block.mlp(block.norm2(x_att)), probs


def _segments(cu, s):
    return torch.bucketize(torch.arange(s), cu[1:].long(), right=True)


@pytest.mark.parametrize("block", [0, 1])
def test_blocks_on_kept_tokens_are_blocks_that_mask_the_others(reference, block, monkeypatch):
    """A block run on 40 of 108 merged tokens (BlockTower) gives each kept patch what the
    whole block gives it when attention to the dropped patches is masked out, within
    transformers' own segments (Qwen2.5-VL: block 0 a window, block 1 the whole image),
    each at its own rotary position; its probe is that softmax per token (chunked
    over queries across tokens' boundaries)."""
    from vllm_vtprune.families import qwen2_vl

    monkeypatch.setattr(qwen2_vl, "PROBE_CHUNK", 7)
    visual = reference.model.model.visual
    captured, patches, grid_thw = _first_block_inputs(reference, _image((336, 252)))
    x, s = captured["hidden"], captured["hidden"].shape[0]
    units = s // 4
    if hasattr(visual, "window_size"):
        window_index, cu_windows = _window_index(visual, grid_thw)
        full = block in visual.fullatt_block_indexes
        segment = torch.zeros(s, dtype=torch.long) if full else _segments(cu_windows, s)
    else:
        window_index, segment = torch.arange(units), torch.zeros(s, dtype=torch.long)
    kept = torch.sort(torch.randperm(units, generator=torch.Generator().manual_seed(5))[:40]).values
    keep = torch.isin(window_index, kept).repeat_interleave(4)
    back = torch.argsort(window_index)  # blocks' order -> raster order of tokens

    with torch.no_grad():
        ref_att, ref_out, probs = _masked_block(visual.blocks[block], x,
                                                captured["position_embeddings"], segment, keep)
        tower = reference.tower.for_image(grid_thw).layered()
        hidden = tower.embed(patches)
        tower.keep(kept)
        x_att, x_out, probe = tower.layer_probed(block, hidden[:, kept])
        plain = tower.layer(block, hidden[:, kept])

    def raster(t):  # [S, ...] blocks' order -> [kept tokens, 4 * ...]
        return t.reshape(units, -1)[back][kept]

    # two float32 softmax paths (kept keys only vs every key, the others masked):
    # measured 1.3e-6 apart here on outputs up to 14; what masking and windows move is
    # 0.11 and more (below), so 1e-4 leaves either side a wide margin on any CPU
    torch.testing.assert_close(x_att[0], raster(ref_att), rtol=0, atol=1e-4)
    torch.testing.assert_close(x_out[0], raster(ref_out), rtol=0, atol=1e-4)
    assert torch.equal(plain, x_out)
    mean = probs.mean(0)  # [S, S]
    to_units = mean.view(s, units, 4).sum(-1)[keep]  # kept queries -> every token
    query_units = torch.arange(s)[keep] // 4
    attn = torch.zeros(units, units).index_add_(0, query_units, to_units) / 4
    torch.testing.assert_close(probe.attn, attn[back][:, back][kept][:, kept],
                               rtol=1e-5, atol=1e-7)
    received = mean[keep].mean(0).view(units, 4).mean(-1)
    torch.testing.assert_close(probe.received, received[back][kept], rtol=1e-5, atol=1e-7)
    # the masking and the segments matter far beyond the tolerance
    _, unmasked, _ = _masked_block(visual.blocks[block], x, captured["position_embeddings"],
                                   segment, torch.ones(s, dtype=torch.bool))
    assert (raster(unmasked) - x_out[0]).abs().max() > 1e-2
    if segment.max() > 0:
        _, one, _ = _masked_block(visual.blocks[block], x, captured["position_embeddings"],
                                  torch.zeros(s, dtype=torch.long), keep)
        assert (raster(one) - x_out[0]).abs().max() > 1e-2


def test_blocks_one_by_one_unpruned_are_the_encoder(reference):
    """Every block run by BlockTower on every token, then the merger: transformers' own
    image features, bit for bit."""
    image = _image((280, 420))
    patches, grid_thw = reference.pixel_values([image])[0]
    encoder = reference.tower.for_image(grid_thw)
    with torch.no_grad():
        expected = encoder.project(encoder.embed(patches)[0])
        tower = encoder.layered()
        hidden = tower.embed(patches)
        for i in range(tower.num_layers):
            hidden = tower.layer(i, hidden)
        assert torch.equal(encoder.project(hidden[0]), expected)
