"""Shared input validation for the pruning methods in :mod:`vllm_vtprune.methods`.

Every method computes in float32 whatever dtype the model runs in (fp16/bf16 cosine
similarities and density estimates lose too much precision to give stable rankings),
and rejects NaN/Inf early: a NaN score silently turns argmax/top-k selections into
arbitrary picks, which is much harder to debug downstream than a ValueError here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_tokens", "check_finite", "check_budget", "as_float32"]


def as_float32(x: Tensor) -> Tensor:
    """Return a float32 copy of ``x`` (always a copy, so callers may modify it)."""
    return x.detach().to(dtype=torch.float32).clone()


def check_finite(x: Tensor, name: str = "tensor") -> Tensor:
    """Raise ValueError if ``x`` holds NaN or Inf; return ``x`` as a float32 copy."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.bool)):
        raise ValueError(f"{name} has unsupported dtype {x.dtype}")
    y = as_float32(x)
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


def check_budget(budget: int, name: str = "budget") -> int:
    """Validate an integer token budget (>= 1) and return it as a Python int."""
    if isinstance(budget, bool) or not isinstance(budget, int):
        try:
            import numbers

            if isinstance(budget, numbers.Integral):
                budget = int(budget)
            else:
                raise TypeError
        except TypeError:
            raise ValueError(f"{name} must be an integer >= 1, got {budget!r}") from None
    if budget < 1:
        raise ValueError(f"{name} must be >= 1, got {budget}")
    return int(budget)
