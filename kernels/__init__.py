"""Triton kernels of vllm-vtprune (installed as ``vllm_vtprune.kernels``).

``resprune_select`` / ``resprune_select_batch`` dispatch between the Triton kernel
(CUDA tensors) and the torch path (CPU tensors); ``VTPRUNE_KERNELS=triton|torch|auto``
forces either.  triton itself is imported only when the kernel path is taken.
"""

from vllm_vtprune.kernels.resprune import (
    kernel_mode,
    resprune_order_batch,
    resprune_select,
    resprune_select_batch,
)

__all__ = ["kernel_mode", "resprune_order_batch", "resprune_select", "resprune_select_batch"]
