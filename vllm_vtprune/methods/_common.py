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
    "layer_counts",
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
    # x * 0 is 0 for every finite x and NaN for NaN and +-Inf (IEEE 754 on any CPU): one
    # pass and a sum, a tenth of what an element-wise isfinite mask costs
    if not bool(torch.isfinite((y * 0).sum())):
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


def scale_layers(reference: tuple[int, ...], num_layers: int, depth: int = 32) -> tuple[int, ...]:
    """A paper's decoder layers for a ``depth``-layer LLM (LLaVA-1.5-7B: 32) mapped onto
    ``num_layers``: each rounded proportionally, kept in [1, num_layers - 1] (a decision
    reads the previous layer's attention) and strictly increasing (a collision moves up)."""
    out: list[int] = []
    for layer in reference:
        scaled = max(1, round(layer * num_layers / depth), out[-1] + 1 if out else 1)
        if scaled >= num_layers:
            raise ValueError(f"layers {reference} of {depth} do not fit a {num_layers}-layer "
                             "decoder")
        out.append(scaled)
    return tuple(out)


def check_layers(layers: tuple[int, ...], num_layers: int, what: str) -> tuple[int, ...]:
    """Refuse decision layers outside [1, num_layers - 1] or not increasing."""
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 1 \
            or layers[-1] >= num_layers:
        raise ValueError(f"{what} layers {'-'.join(map(str, layers))} are outside the "
                         f"model's decoder; accepted: increasing layers from 1 to "
                         f"{num_layers - 1}")
    return layers


def layer_counts(num_layers: int, start: int, schedule: dict[int, int]) -> list[int]:
    """Visual tokens per decoder layer: ``start`` until the first layer of ``schedule``
    ({layer: count from that layer on}), then each count in turn."""
    counts, current = [], start
    for layer in range(num_layers):
        current = schedule.get(layer, current)
        counts.append(current)
    return counts


def average_schedule(num_tokens: int, budget: int, layers: tuple[int, ...],
                     num_layers: int) -> list[int]:
    """Token counts after each pruning layer such that the count averaged over all
    ``num_layers`` decoder layers is about ``budget`` (layers before ``layers[0]`` see
    ``num_tokens``): one geometric ratio r for every pruning layer (the count after the
    s-th is round(N r^s), at least 1), found by bisection."""
    n = check_budget(num_tokens, "num_tokens")
    k = check_budget(budget)
    if list(layers) != sorted(set(layers)) or not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers must be increasing indices in [0, {num_layers}), got {layers}")
    if k >= n:
        return [n] * len(layers)

    def counts(r: float) -> list[int]:
        return [max(1, int(round(n * r ** (s + 1)))) for s in range(len(layers))]

    def average(r: float) -> float:
        return sum(layer_counts(num_layers, n, dict(zip(layers, counts(r))))) / num_layers

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(mid) < k else (lo, mid)
    return counts(lo)
