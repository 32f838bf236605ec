"""Triton kernel for ResPrune's greedy selection (pivoted Cholesky on the Gram matrix).

Imported lazily by :mod:`vllm_vtprune.kernels.resprune` (so that ``import
vllm_vtprune.kernels`` works without triton).  Uses only APIs available in triton 3.6
(``tl.div_rn``/``tl.sqrt_rn`` for IEEE-rounded division and square root, so that fp32
results match the torch path; plain ``/`` and ``tl.sqrt`` are approximate on CUDA).

Both implement the restart rule of :mod:`vllm_vtprune.methods.resprune` (module
docstring): when every unselected token's residual energy is 0 (the current round's
picks span them all), a new round starts at this step ``r0``: the unselected energies
are reset to the initial energies ``e0`` and only the rows ``L[r0:k]`` enter the update.

Two kernels.  ``_resprune_persistent_kernel`` (N <= ``PERSISTENT_MAX_N``): one program
per image runs all K steps with the residual energies, initial energies, gate and
diag(G) held in registers; only the rows of L go through global memory (L2), read back
after a ``tl.debug_barrier()``.  ``_resprune_step_kernel`` (any N, e.g. 10,000 for
Qwen2.5-VL at high resolution): one launch per greedy step, grid
``(cdiv(N, BLOCK), B)``: every program

1. finds the step's pivot p of its image from the residual energies of the previous
   step (``e_in``, read-only in this launch): if every unselected ``e_in`` is 0 it
   restarts (effective energies ``e0`` for the unselected tokens, round start
   ``r0 = step``), else the effective energies are ``e_in`` and ``r0`` is the previous
   round start (``r0_in``); then gated score ``gate * e`` (Eq. (14)), max, then the
   lowest index with score ``>= max * TIE_SCALE`` (Eq. (16), ties to the lowest index);
   if the max is 0 the same on the ungated energies (fallback).  Every program of an
   image computes the same restart decision and p (an O(N) scan, cheap next to step 2);
2. computes its block of the new row ``L[k, :] = (G[p, :] - sum_{r0<=j<k} L[j, p]
   L[j, :]) / sqrt(e_p)`` and the rank-1 energy update ``e_out = e - L[k, :]**2`` with
   the round-off floor, marks p selected (energy -1); program 0 writes ``order[b, k] =
   p`` and ``r0_out[b] = r0``.

``e_in``/``e_out`` and ``r0_in``/``r0_out`` are swapped by the host between launches
(double buffering), so no program reads a value another program of the same launch
writes: the kernel needs no barriers and no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pivot_scan(e_in, e0, gate, N, SCAN: tl.constexpr, TIE_SCALE: tl.constexpr):
    """Pivot and restart decision of one image from ``e_in`` (see module docstring).

    Pass 1 takes the maxima both of the current energies and of the energies a restart
    would use (``e0`` on the unselected tokens), so one pass decides the restart; pass 2
    finds the lowest index within the tie window on the effective energies.
    """
    m_s = tl.max(tl.full([SCAN], -1.0, tl.float32), axis=0)
    m_e = m_s
    m_s0 = m_s
    m_e0 = m_s
    for start in range(0, N, SCAN):
        o = start + tl.arange(0, SCAN)
        msk = o < N
        e = tl.load(e_in + o, mask=msk, other=-1.0)
        gt = tl.load(gate + o, mask=msk, other=0.0)
        r = tl.where(e < 0.0, -1.0, tl.load(e0 + o, mask=msk, other=-1.0))
        m_s = tl.maximum(m_s, tl.max(tl.where(e < 0.0, -1.0, gt * e), axis=0))
        m_e = tl.maximum(m_e, tl.max(e, axis=0))
        m_s0 = tl.maximum(m_s0, tl.max(tl.where(r < 0.0, -1.0, gt * r), axis=0))
        m_e0 = tl.maximum(m_e0, tl.max(r, axis=0))
    restart = m_e <= 0.0  # the round's picks span every unselected token
    thr_s = tl.where(restart, m_s0, m_s) * TIE_SCALE
    thr_e = tl.where(restart, m_e0, m_e) * TIE_SCALE
    i_s = N
    i_e = N
    for start in range(0, N, SCAN):
        o = start + tl.arange(0, SCAN)
        msk = o < N
        e = tl.load(e_in + o, mask=msk, other=-1.0)
        r = tl.load(e0 + o, mask=msk, other=-1.0)
        e = tl.where(restart, tl.where(e < 0.0, e, r), e)
        gt = tl.load(gate + o, mask=msk, other=0.0)
        s = tl.where(e < 0.0, -1.0, gt * e)
        i_s = tl.minimum(i_s, tl.min(tl.where(msk & (s >= thr_s), o, N), axis=0))
        i_e = tl.minimum(i_e, tl.min(tl.where(msk & (e >= thr_e), o, N), axis=0))
    p = tl.where(tl.where(restart, m_s0, m_s) > 0.0, i_s, i_e)
    return p, restart


@triton.jit(do_not_specialize=["N", "K", "step"])
def _resprune_step_kernel(
    g_ptr,  # [B, N, N] fp32 Gram matrices
    gate_ptr,  # [B, N] fp32 gate g(r)
    diag_ptr,  # [B, N] fp32 diag(G)
    e0_ptr,  # [B, N] fp32 initial energies (restored on a restart)
    e_in_ptr,  # [B, N] fp32 residual energies before this step (-1 = selected)
    e_out_ptr,  # [B, N] fp32 after this step
    r0_in_ptr,  # [B] int32 step at which the current round began
    r0_out_ptr,  # [B] int32 the same after this step
    l_ptr,  # [B, K, N] fp32 rows of L
    order_ptr,  # [B, K] int32 picks in order
    seed_ptr,  # [B] int32 first picks
    N,
    K,
    step,
    TIE_SCALE: tl.constexpr,
    RTOL: tl.constexpr,
    BLOCK: tl.constexpr,
    SCAN: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n64 = N.to(tl.int64)
    e_in = e_in_ptr + b * n64
    e0 = e0_ptr + b * n64
    lb = l_ptr + b * K * n64

    # ---- 1. pivot of this step (and whether a new round starts) -------------------------
    if step == 0:
        p = tl.load(seed_ptr + b)
        restart = step < 0  # never: round 1 begins with the seed
    else:
        p, restart = _pivot_scan(e_in, e0, gate_ptr + b * n64, N, SCAN, TIE_SCALE)
    r0 = tl.where(restart, step, tl.load(r0_in_ptr + b))
    p64 = p.to(tl.int64)
    d = tl.where(restart, tl.load(e0 + p64), tl.load(e_in + p64))

    # ---- 2. new row of L and rank-1 energy update on this program's block --------------
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    msk = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(r0, step):  # rows of the current round only
        c = tl.load(lb + j * n64 + p64)
        acc += c * tl.load(lb + j * n64 + offs, mask=msk, other=0.0)
    grow = tl.load(g_ptr + b * n64 * n64 + p64 * n64 + offs, mask=msk, other=0.0)
    pos = d > 0.0
    den = tl.sqrt_rn(tl.where(pos, d, 1.0))
    row = tl.where(pos, tl.div_rn(grow - acc, den), 0.0)
    tl.store(lb + step * n64 + offs, row, mask=msk)

    e_old = tl.load(e_in + offs, mask=msk, other=0.0)
    e0_blk = tl.load(e0 + offs, mask=msk, other=0.0)
    e_old = tl.where(restart, tl.where(e_old < 0.0, e_old, e0_blk), e_old)
    dg = tl.load(diag_ptr + b * n64 + offs, mask=msk, other=0.0)
    sq = row * row
    e_new = e_old - sq
    e_new = tl.where(e_new <= RTOL * dg, 0.0, e_new)
    e_new = tl.where((e_old < 0.0) | (offs == p), -1.0, e_new)
    tl.store(e_out_ptr + b * n64 + offs, e_new, mask=msk)
    if pid == 0:
        tl.store(order_ptr + b * K + step, p)
        tl.store(r0_out_ptr + b, r0)


@triton.jit(do_not_specialize=["N", "K"])
def _resprune_persistent_kernel(
    g_ptr,  # [B, N, N] fp32
    gate_ptr,  # [B, N] fp32
    diag_ptr,  # [B, N] fp32
    e0_ptr,  # [B, N] fp32 initial energies
    l_ptr,  # [B, K, N] fp32 rows of L (global; read back after a barrier)
    order_ptr,  # [B, K] int32
    seed_ptr,  # [B] int32
    N,
    K,
    TIE_SCALE: tl.constexpr,
    RTOL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per image runs all K steps; e, e0, gate, diag(G) stay in registers
    (BLOCK_N >= N).  Same arithmetic, in the same order, as the step kernel."""
    b = tl.program_id(0).to(tl.int64)
    n64 = N.to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    msk = offs < N
    gate = tl.load(gate_ptr + b * n64 + offs, mask=msk, other=0.0)
    dg = tl.load(diag_ptr + b * n64 + offs, mask=msk, other=0.0)
    e0 = tl.load(e0_ptr + b * n64 + offs, mask=msk, other=-1.0)  # padding: "selected"
    e = e0
    lb = l_ptr + b * K * n64
    seed = tl.load(seed_ptr + b)
    r0 = tl.full([], 0, tl.int32)  # step at which the current round began (loop-carried)
    for step in range(0, K):
        # restart: the round's picks span every unselected token -> new round from e0
        # (at step 0 it is a no-op: e is e0 and r0 is 0 already)
        restart = tl.max(e, axis=0) <= 0.0
        e = tl.where(restart, tl.where(e < 0.0, e, e0), e)  # selected stay -1
        r0 = tl.where(restart, step, r0)
        s = tl.where(e < 0.0, -1.0, gate * e)
        m_s = tl.max(s, axis=0)
        m_e = tl.max(e, axis=0)
        i_s = tl.min(tl.where(msk & (s >= m_s * TIE_SCALE), offs, N), axis=0)
        i_e = tl.min(tl.where(msk & (e >= m_e * TIE_SCALE), offs, N), axis=0)
        p = tl.where(m_s > 0.0, i_s, i_e)
        p = tl.where(step == 0, seed, p)
        p64 = p.to(tl.int64)
        d = tl.sum(tl.where(offs == p, e, 0.0), axis=0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # rows of the current round only: a loop from the loop-carried r0 picked wrong
        # pivots once a second round began on an H100 (triton 3.6; the interpreter was
        # right), so rows before r0 enter with weight 0 (adding 0.0 changes no bit)
        for j in range(0, step):
            c = tl.where(j >= r0, tl.load(lb + j * n64 + p64), 0.0)
            acc += c * tl.load(lb + j * n64 + offs, mask=msk, other=0.0)
        grow = tl.load(g_ptr + b * n64 * n64 + p64 * n64 + offs, mask=msk, other=0.0)
        pos = d > 0.0
        den = tl.sqrt_rn(tl.where(pos, d, 1.0))
        row = tl.where(pos, tl.div_rn(grow - acc, den), 0.0)
        tl.store(lb + step * n64 + offs, row, mask=msk)
        sq = row * row
        e_new = e - sq
        e_new = tl.where(e_new <= RTOL * dg, 0.0, e_new)
        e = tl.where((e < 0.0) | (offs == p), -1.0, e_new)
        tl.store(order_ptr + b * K + step, p)
        # the next step reads L[step, p'] written by other threads of this program
        tl.debug_barrier()


#: Largest N handled by the persistent (state-in-registers) kernel.
PERSISTENT_MAX_N = 4096


def launch_greedy(g, gate, diag, e0, seeds, k, block=1024, scan=1024, persistent=None):
    """Run the K-step greedy loop on stacked inputs; returns int32 order [B, k].

    ``g`` [B, N, N], ``gate``/``diag``/``e0`` [B, N] float32 contiguous; ``seeds`` [B]
    int32; all on the same device.  ``persistent`` (default: N <= PERSISTENT_MAX_N)
    picks the one-program-per-image kernel that keeps the energies on chip for all K
    steps; otherwise one launch per step with ``cdiv(N, block)`` programs per image.
    """
    import torch

    bsz, n = gate.shape
    from vllm_vtprune.methods.resprune import RTOL, TIE_SCALE

    if persistent is None:
        persistent = n <= PERSISTENT_MAX_N
    if persistent:
        lmat = torch.zeros(bsz, k, n, dtype=torch.float32, device=g.device)
        order = torch.empty(bsz, k, dtype=torch.int32, device=g.device)
        bn = triton.next_power_of_2(n)
        _resprune_persistent_kernel[(bsz,)](
            g, gate, diag, e0, lmat, order, seeds, n, k,
            TIE_SCALE=TIE_SCALE, RTOL=RTOL, BLOCK_N=bn, num_warps=8 if bn >= 2048 else 4,
        )
        return order
    block = min(block, triton.next_power_of_2(n))
    scan = min(scan, triton.next_power_of_2(n))
    e_a = e0.clone()
    e_b = torch.empty_like(e0)
    r_a = torch.zeros(bsz, dtype=torch.int32, device=g.device)  # round 1 starts at step 0
    r_b = torch.empty_like(r_a)
    lmat = torch.zeros(bsz, k, n, dtype=torch.float32, device=g.device)
    order = torch.empty(bsz, k, dtype=torch.int32, device=g.device)
    grid = (triton.cdiv(n, block), bsz)

    for step in range(k):
        _resprune_step_kernel[grid](
            g, gate, diag, e0, e_a, e_b, r_a, r_b, lmat, order, seeds, n, k, step,
            TIE_SCALE=TIE_SCALE, RTOL=RTOL, BLOCK=block, SCAN=scan,
        )
        e_a, e_b = e_b, e_a
        r_a, r_b = r_b, r_a
    return order
