"""Dispatch for ResPrune's greedy selection: Triton kernel or torch path.

``VTPRUNE_KERNELS`` (read at every call):

* ``auto`` (default): CUDA tensors use the Triton kernel (when triton imports), CPU
  tensors the torch path of :mod:`vllm_vtprune.methods.resprune`;
* ``triton``: always the kernel (CPU tensors then need ``TRITON_INTERPRET=1``);
* ``torch``: always the torch path.

Both paths share the preprocessing (:func:`vllm_vtprune.methods.resprune.prepare_inputs`:
validation, fp32 upcast, squared norms, gate of Eq. (13)/(15), floored initial energies,
seed) and the restart rule, so on fp32 inputs they return the same indices; the only
differences are summation orders (the kernel reads the pivot rows of G from one matmul,
the torch path computes each as a matrix-vector product; ``sum_j L[j, p] L[j, :]`` is a
BLAS call there and a sequential loop in the kernel), i.e. ulp-level differences that can
only matter on near-ties.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from vllm_vtprune.methods import resprune as _rp

__all__ = ["kernel_mode", "resprune_select", "resprune_select_batch", "resprune_order_batch"]

_MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    mode = os.environ.get("VTPRUNE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"VTPRUNE_KERNELS must be one of {_MODES}, got {mode!r}")
    return mode


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _use_triton(device: torch.device) -> bool:
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return device.type == "cuda" and _triton_available()


def resprune_order_batch(
    tokens: Tensor,
    budget: int,
    text=None,
    alpha: float = 0.75,
    seeds=None,
    *,
    block: int = 1024,
    persistent: Optional[bool] = None,
) -> Tensor:
    """Triton kernel path, picks in order: int64 [B, min(budget, N)] (seed first).

    Same arguments as :func:`vllm_vtprune.methods.resprune.select_batch`.  ``block``
    and ``persistent`` choose the kernel variant (see ``_resprune_triton``); the
    default is the on-chip persistent kernel for N <= 4096, else the per-step one.
    """
    texts, seed_list = _rp._split_batch_args(tokens, text, seeds)
    bsz = tokens.shape[0]
    if bsz == 0:
        _rp.check_budget(budget)
        return torch.empty(0, 0, dtype=torch.int64, device=tokens.device)
    # the same preparation (G, gate, floored initial energies, seed) as the torch path
    prep = [
        _rp.prepare_inputs(tokens[i], budget, texts[i], alpha, seed_list[i])
        for i in range(bsz)
    ]
    from vllm_vtprune.kernels._resprune_triton import launch_greedy

    def stacked(field):
        return torch.stack([getattr(p, field) for p in prep]).contiguous()

    order = launch_greedy(
        torch.stack([_rp.gram(p.tokens) for p in prep]).contiguous(),
        stacked("gate"),
        stacked("diag"),
        stacked("e0"),
        torch.tensor([p.seed for p in prep], dtype=torch.int32, device=tokens.device),
        prep[0].k,
        block=block,
        scan=block,
        persistent=persistent,
    )
    return order.to(torch.int64)


def resprune_select_batch(
    tokens: Tensor,
    budget: int,
    text=None,
    alpha: float = 0.75,
    seeds=None,
) -> Tensor:
    """Batched ResPrune selection, int64 [B, min(budget, N)], each row ascending.

    Signature and result as :func:`vllm_vtprune.methods.resprune.select_batch`;
    dispatched by device and ``VTPRUNE_KERNELS``.
    """
    if not isinstance(tokens, Tensor):
        raise TypeError("tokens must be a torch.Tensor")
    if _use_triton(tokens.device):
        return torch.sort(resprune_order_batch(tokens, budget, text, alpha, seeds), dim=1).values
    return _rp.select_batch(tokens, budget, text, alpha, seeds)


def resprune_select(
    tokens: Tensor,
    budget: int,
    text: Optional[Tensor] = None,
    alpha: float = 0.75,
    seed: Optional[int] = None,
) -> Tensor:
    """ResPrune selection for one image; same contract as ``methods.resprune.select``."""
    if not isinstance(tokens, Tensor):
        raise TypeError("tokens must be a torch.Tensor")
    if _use_triton(tokens.device):
        if tokens.dim() != 2:
            _rp.check_tokens(tokens, "tokens")  # raises the shape error
        out = resprune_order_batch(tokens.unsqueeze(0), budget, [text], alpha, [seed])
        return torch.sort(out[0]).values
    return _rp.select(tokens, budget, text, alpha, seed)
