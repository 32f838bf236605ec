"""LLaVA-NeXT (``llava-hf/llava-v1.6-*`` layout): LLaVA-1.5's CLIP tower and projector
run on several 336 px tiles of one image, the base (whole image resized) and the crops of
an "anyres" grid chosen from ``image_grid_pinpoints``; the crops' patch grids are stitched
into one high-resolution grid, the padding the resize added is cut off ("unpad"), and a
learned ``image_newline`` follows every row of it:

    [base: 24 x 24 patches] [row 0 of the unpadded grid] <nl> [row 1] <nl> ...

How vtprune prunes it (LLaVA-NeXT: Improved reasoning, OCR, and world knowledge, 2024;
the layout as transformers' ``LlavaNextModel.pack_image_features`` writes it):

* **The budget is per image, across its tiles.** A method sees the image's patches of
  every tile at once, the base's and the unpadded grid's, and keeps ``K`` of them, so a
  tile with more detail may keep more than another. The papers that report LLaVA-NeXT
  ("ResPrune: Text-Conditioned Subspace Reconstruction for Visual Token Pruning",
  arXiv 2603.21105, Table II; VisionZip's LLaVA-NeXT table) prune a share of the whole
  image; a ratio spec (``resprune:0.25``) keeps that share of the image's patches.
* **Newline tokens are dropped** when an image is pruned: they mark the end of a row of
  the grid, which no longer exists once most of its tokens are gone, and the
  placeholder count must be fixed before the model decides which rows survive. An
  unpruned image (no spec, or a budget at or above its patch count) keeps them, exactly
  as stock LLaVA-NeXT.
* **CLS attention of a patch is its own tile's** (each tile is a CLIP pass with its own
  CLS token); the base tile's CLS stands first in the packed hidden states, so methods
  that read CLS attention and keys (VisionZip, ResPrune's seed) see one prefix token as
  on LLaVA-1.5. Kept tokens keep the packed order.

* **Inside the LLM** (FastV, RCP) an image's tokens reach the decoder unpruned, newlines
  included, and are all candidates: a budget of K (or a ratio) keeps K of them (of its
  tokens) per image. Polymorphic's stage 1 merges the image's patches (newlines
  dropped) to twice its budget, and its stage 2 keeps the budget's share of the
  image's own patch count, which each image's embeddings carry to the decoder.
* **Inside the encoder** (DCP) each tile's own pass prunes it: the image's budget is
  split over the tiles by their patches in the layout (DCP-Prune's LLaVA-NeXT budgets
  are per-tile ones times the tiles, 80 = 5 x 16), only patches that survive unpadding
  may be kept, and the kept tokens stand in the packed order
  (:func:`vllm_vtprune.pipeline.tile_budgets`).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from vllm_vtprune.families import Family
from vllm_vtprune.families import llava as base
from vllm_vtprune.tiles import Layout

ARCHITECTURE = "VTPruneLlavaNextForConditionalGeneration"
VllmClipTower = base.VllmClipTower
HfClipTower = base.HfClipTower


def _unpadded_span(length: int, original: int, other_current: int, other_original: int):
    """(start, stop) of the rows (or columns) that survive unpadding along one axis, by
    transformers' ``unpad_image``: the padding is half the difference, rounded down, cut
    from both ends."""
    new = int(round(original * (other_current / other_original), 7))
    pad = (length - new) // 2
    return pad, length - pad


def layout(image_size: tuple[int, int], pinpoints: list, tile_px: int, side: int) -> Layout:
    """The packed layout of an image of ``image_size`` (height, width) for a tower of
    ``tile_px`` pixels and ``side`` x ``side`` patches per tile."""
    return _layout(tuple(int(v) for v in image_size),
                   tuple(tuple(int(v) for v in p) for p in pinpoints), tile_px, side)


@lru_cache(maxsize=256)
def _layout(image_size, pinpoints, tile_px, side) -> Layout:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    rows_t, cols_t = get_anyres_image_grid_shape(list(image_size), [list(p) for p in pinpoints],
                                                 tile_px)
    height, width = rows_t * side, cols_t * side
    (r0, r1), (c0, c1) = (0, height), (0, width)
    orig_h, orig_w = image_size
    if orig_w / orig_h > width / height:  # wider than the grid: rows of padding
        r0, r1 = _unpadded_span(height, orig_h, width, orig_w)
    else:
        c0, c1 = _unpadded_span(width, orig_w, height, orig_h)
    r = torch.arange(r0, r1, device="cpu").repeat_interleave(c1 - c0)
    c = torch.arange(c0, c1, device="cpu").repeat(r1 - r0)
    grid_tile = 1 + (r // side) * cols_t + c // side
    grid_patch = (r % side) * side + c % side
    base_n = side * side
    tile = torch.cat([torch.zeros(base_n, dtype=torch.int64, device="cpu"), grid_tile])
    patch = torch.cat([torch.arange(base_n, device="cpu"), grid_patch])
    newline = torch.zeros(tile.shape[0], dtype=torch.bool, device="cpu")
    newline[base_n + (c1 - c0) - 1::c1 - c0] = True
    return Layout(1 + rows_t * cols_t, tile, patch, newline)


def layout_of(hf_config, image_size: tuple[int, int]) -> Layout:
    vision = hf_config.vision_config
    return layout(image_size, hf_config.image_grid_pinpoints, vision.image_size,
                  vision.image_size // vision.patch_size)


# ---------------------------------------------------------------- config
def matches(hf_config) -> bool:
    vision = getattr(hf_config, "vision_config", None)
    return (getattr(hf_config, "model_type", None) == "llava_next"
            and getattr(vision, "model_type", None) == "clip_vision_model")


def check(hf_config) -> None:
    base.check(hf_config)
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vtprune: LLaVA-NeXT with vision_feature_layer {layer!r} (several "
                         "layers) is not supported; supported: one layer index")


def prunable_tokens(hf_config, image_width: int, image_height: int) -> int:
    return layout_of(hf_config, (image_height, image_width)).num_patches


FAMILY = Family(
    name="LLaVA-NeXT",
    description="model_type 'llava_next' with a CLIP vision tower, e.g. "
                "llava-hf/llava-v1.6-vicuna-7b-hf",
    architecture=ARCHITECTURE,
    vllm_class="vllm_vtprune.models.llava_next:VTPruneLlavaNextForConditionalGeneration",
    matches=matches,
    check=check,
    grid=base.grid,
    question_ids=base.question_ids,
    provides=frozenset({"cls_attention", "keys", "text", "llm_attention", "encoder_layers"}),
    images="a base tile and an anyres grid of 336 px tiles, unpadded, a newline per grid "
           "row (up to 2,928 tokens); a budget of K (or a ratio) keeps K of the image's "
           "patches across its tiles, newlines dropped (inside the LLM: K of its tokens)",
    prunable_tokens=prunable_tokens,
    reference="vllm_vtprune.hf:HfNextReference",
)
