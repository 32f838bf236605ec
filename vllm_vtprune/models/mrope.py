"""M-RoPE positions of pruned images (Qwen2-VL, "Qwen2-VL: Enhancing Vision-Language
Model's Perception of the World at Any Resolution", arXiv 2409.12191, Sec. 2.1, M-RoPE):
a kept visual token keeps the (t, h, w) of its place in the unpruned grid, and the text
after an image keeps the positions it has without pruning (the image's start plus the
largest grid extent).

vLLM computes a request's positions once, before its images are encoded, from the
placeholder counts; which tokens an image keeps is only known after the encoder. The
positions therefore go in two steps, through vLLM's own multimodal-pruning hook
(``SupportsMultiModalPruning.recompute_mrope_positions``, which vLLM's EVS uses for
video):

1. :func:`input_positions` (the model's ``get_mrope_input_positions``): text at its
   unpruned positions, each image's K placeholder rows at a provisional position;
2. the encoder appends :data:`CHANNELS` channels to every kept token holding its grid
   (t, h, w) (:func:`encode`), and :func:`recompute` (called by vLLM's model runner when
   the step's image embeddings are gathered) strips them and writes each image row's
   position: its grid place plus the position after the ``<|vision_start|>`` before it.

vLLM's generic EVS recompute places the text after an image at ``start + grid width``,
which is wrong for images taller than wide; the text here is never renumbered.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

#: Channels appended to each kept token: t, h, w split into high and low parts base 256,
#: so they stay exact in bf16 (integers up to 256 are).
CHANNELS = 6
_BASE = 256


def encode(kept: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """[K, 6] channels of the kept tokens' places (raster indices into the merged
    ``grid`` (t, h, w))."""
    _, gh, gw = grid
    kept = kept.to(torch.int64).cpu()
    thw = torch.stack([kept // (gh * gw), (kept // gw) % gh, kept % gw], dim=1)
    return torch.cat([thw // _BASE, thw % _BASE], dim=1).float()


def decode(channels: Tensor) -> Tensor:
    """[K, 6] channels -> [3, K] (t, h, w) places."""
    c = channels.float().round().long()
    return (c[:, :3] * _BASE + c[:, 3:]).T


def input_positions(num_tokens: int, images: Sequence[tuple[int, int, tuple[int, int, int]]]
                    ) -> tuple[Tensor, int]:
    """[3, num_tokens] positions of a prompt whose images are ``(offset, placeholders,
    merged grid (t, h, w))`` in prompt order, and the decode delta (max + 1 - length).

    Text runs consecutively; an image's rows get its start position (provisional, see
    :func:`recompute`); the text after it continues at start + max(t, h, w), where it
    stands when the image is not pruned."""
    chunks, done, current = [], 0, 0
    for offset, count, (t, h, w) in images:
        text = offset - done
        chunks.append(np.broadcast_to(np.arange(text), (3, text)) + current)
        current += text
        chunks.append(np.full((3, count), current, dtype=np.int64))
        current += max(t, h, w)
        done = offset + count
    text = num_tokens - done
    chunks.append(np.broadcast_to(np.arange(text), (3, text)) + current)
    positions = np.concatenate(chunks, axis=1)
    return torch.from_numpy(np.ascontiguousarray(positions)), int(positions.max() + 1 - num_tokens)


def recompute(input_ids, embeddings: Sequence[Tensor], positions: Tensor,
              num_computed_tokens: int, image_token_id: int):
    """``recompute_mrope_positions``: the step's image embeddings without their channels,
    the prompt's positions with the step's image rows at their grid places, the delta.

    ``embeddings`` are this step's slices of each image's kept tokens, in prompt order
    (a prefill chunk may hold part of an image); only image rows change, so a second call
    gives the same result."""
    n = len(input_ids)
    if not embeddings:
        return embeddings, positions, int(positions.max() + 1 - n)
    stripped = [e[:, :-CHANNELS] for e in embeddings]
    places = decode(torch.cat([e[:, -CHANNELS:] for e in embeddings]))
    dev = positions.device
    ids = torch.as_tensor(input_ids, device=dev)
    is_image = ids == image_token_id
    first = is_image & ~torch.cat([torch.zeros(1, dtype=torch.bool, device=dev), is_image[:-1]])
    run_start = torch.cummax(torch.where(first, torch.arange(n, device=dev), 0), dim=0).values
    rows = is_image.nonzero().squeeze(1)
    rows = rows[rows >= num_computed_tokens][:places.shape[1]]
    start = positions[0, run_start[rows] - 1] + 1  # after the text before the image
    out = positions.clone()
    out[:, rows] = places.to(device=dev, dtype=out.dtype) + start
    return stripped, out, int(out.max() + 1 - n)
