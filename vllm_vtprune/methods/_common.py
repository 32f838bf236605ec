"""Shared input validation and small numerics for :mod:`vllm_vtprune.methods`.

Every method computes in float32 whatever dtype the model runs in (fp16/bf16 cosine
similarities and density estimates lose too much precision to give stable rankings),
and rejects NaN/Inf early: a NaN score silently turns argmax/top-k selections into
arbitrary picks, which is much harder to debug downstream than a ValueError here.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "check_tokens",
    "check_vector",
    "check_finite",
    "check_budget",
    "cosine_matrix",
    "stable_topk",
    "segment_mean",
]

#: Added to norms and denominators; the papers' "epsilon" where they name one.
EPS = 1e-8


def check_finite(x: Tensor, name: str = "tensor") -> Tensor:
    """Raise ValueError if ``x`` holds NaN or Inf; return it as a float32 copy."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"{name} has unsupported dtype {x.dtype}")
    y = x.detach().to(dtype=torch.float32).clone()
    if not torch.isfinite(y).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return y


def check_tokens(x: Tensor, name: str = "tokens") -> Tensor:
    """Validate a token matrix [N, D] and return it as a float32 copy.

    Raises ValueError for non-2-D input, an empty matrix (N == 0 or D == 0), or
    NaN/Inf entries.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_tokens, dim], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    return check_finite(x, name)


def check_vector(x: Tensor, n: int | None = None, name: str = "scores") -> Tensor:
    """Validate a 1-D score vector (length ``n`` if given); return a float32 copy."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(x.shape)}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} has length {x.shape[0]}, expected {n}")
    return check_finite(x, name)


def check_budget(budget: int, name: str = "budget") -> int:
    """Validate an integer token budget (>= 1) and return it as a Python int."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {budget!r}")
    if budget < 1:
        raise ValueError(f"{name} must be >= 1, got {budget}")
    return int(budget)


def cosine_matrix(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Pairwise cosine similarity; a zero vector has cosine 0 with everything.

    The zero-vector convention (instead of NaN) is what the ``+ eps`` denominators
    in the papers amount to.
    """
    b = a if b is None else b
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(EPS)
    bn = b / b.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return an @ bn.T


def stable_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, ties to the lowest index, sorted ascending.

    ``torch.topk`` does not promise which of several equal scores it returns; a
    stable descending sort does (the earlier index first), which keeps selections
    deterministic across devices and batch layouts.
    """
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def segment_mean(x: Tensor, segment: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """Mean of the rows of ``x`` [N, C] in each of ``num_segments`` segments
    (``segment`` [N] int64 ids), in ``x``'s dtype, and the segment sizes (float).

    An empty segment's mean is 0; callers decide what it stands for. One matmul with a
    one-hot matrix, so the sum order does not depend on the segment layout.
    """
    one_hot = torch.nn.functional.one_hot(segment, num_segments).to(x.dtype)  # [N, S]
    counts = one_hot.sum(dim=0)
    return (one_hot.T @ x) / counts.clamp_min(1).unsqueeze(1), counts
