"""Random: ``K`` patches drawn uniformly without replacement, the floor every pruning
method is compared against (the "random" rows of the VisionZip, DivPrune and ResPrune
tables).

The draw is seeded from the image itself (a SHA-256 of the processor's float32 pixel
values, hashed before the tower casts them to its dtype, so a bf16 server and the fp32
transformers reference draw the same patches), so a request is deterministic and batch
invariant, and the same image gets the same patches whatever
the prompt: the choice depends on nothing else, so vLLM's caches may share it.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from vllm_vtprune.registry import Method, Where

from ._common import check_budget

__all__ = ["image_seed", "select"]


def image_seed(pixel_values: Tensor) -> int:
    """A 63-bit seed from the bytes of ``pixel_values`` (any shape, fp32 bytes)."""
    data = pixel_values.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return int.from_bytes(hashlib.sha256(data.numpy().tobytes()).digest()[:8], "little") >> 1


def select(num_tokens: int, budget: int, seed: int) -> Tensor:
    """``min(budget, num_tokens)`` distinct indices (int64, ascending), uniformly drawn."""
    n = check_budget(num_tokens, "num_tokens")
    k = min(check_budget(budget), n)
    generator = torch.Generator().manual_seed(seed)
    # drawn on the CPU whatever the model's device, so the draw is the same everywhere
    return torch.sort(torch.randperm(n, generator=generator, device="cpu")[:k]).values


def prune(ctx) -> "PrunedImage":
    """Served entry point: the drawn patches of the feature layer, projected."""
    from vllm_vtprune.pipeline import PrunedImage

    idx = select(ctx.num_patches, ctx.budget, image_seed(ctx.pixel_values))
    return PrunedImage.subset(ctx.project(ctx.patches[idx.to(ctx.patches.device)]), idx)


METHOD = Method(
    name="random",
    where=Where.ENCODER_OUTPUT,
    summary="uniformly random patches, seeded from the image (the baseline floor)",
    paper="baseline of e.g. Yang et al., \"VisionZip\", arXiv 2412.04467, Table 1",
    prune=prune,
)
