"""Images encoded as several tiles whose patches the LLM reads in one packed order
(LLaVA-NeXT's anyres grid): where each token comes from, and the packing itself. Which
tiles and which order is the family's to say (:mod:`vllm_vtprune.families.llava_next`).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each visual token of one image comes from, in the order the LLM reads them.

    ``tile[j], patch[j]``: tile (0: base, 1..: crops in raster order) and raster patch
    index within it of the j-th non-newline token; ``newline_after[j]``: whether a
    newline token follows it (the last token of a row of the unpadded grid).
    """

    num_tiles: int
    tile: Tensor  # [N] int64
    patch: Tensor  # [N] int64
    newline_after: Tensor  # [N] bool

    @property
    def num_patches(self) -> int:
        """Tokens a method chooses among (newlines excluded)."""
        return int(self.tile.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens of the unpruned image, newlines included (vLLM's placeholder count)."""
        return self.num_patches + int(self.newline_after.sum())

    @property
    def rows(self) -> Tensor:
        """[N] where each patch stands among the unpruned image's tokens."""
        breaks = self.newline_after.to(torch.int64)
        index = torch.arange(self.num_patches, device=breaks.device)
        return index + torch.cumsum(breaks, 0) - breaks


def pack(tile_tokens: Tensor, lay: Layout, newline: Tensor | None) -> Tensor:
    """[T, S, D] per-tile tokens (prefix dropped) -> the image's tokens in the LLM's
    order: [num_tokens, D] with ``newline`` [D] after every row of the unpadded grid, or
    [num_patches, D] when ``newline`` is None."""
    tokens = tile_tokens[lay.tile, lay.patch]
    if newline is None:
        return tokens
    at = lay.rows
    out = tokens.new_empty((lay.num_tokens, tokens.shape[-1]))
    out[at] = tokens
    out[at[lay.newline_after] + 1] = newline.to(tokens.dtype)
    return out
