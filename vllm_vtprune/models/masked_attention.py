"""Masked decoder attention for pruning inside the LLM on vLLM's CPU backend.

Installed (``register_backend(CPU_ATTN, ...)``) only by a model served with a method that
acts inside the LLM, beside the layer loop of :mod:`vllm_vtprune.models.in_llm`. A KV slot
whose prune level is ``l`` is attended from layer ``l`` on by no query but its own, for
the rest of the prefill and every decode step (cumulative), which on kept tokens equals
removing the pruned rows (:mod:`vllm_vtprune.llm_loop`, ``mode="mask"``, tested equal
to ``"remove"``). When the loop has taken pruned rows out of the batch, the query rows
are a subset of the step's: :data:`~vllm_vtprune.models.in_llm.STEP` ``.rows`` maps them
back to their slots and positions.

Why a layout of its own: the native CPU kernels store K/V in an ISA-specific layout
(column-major K on AVX, tile-packed on AMX) that only their C++ reads; this backend
reads the layer's cache buffer as token-major slots (``[slot, head, :D]`` = K,
``[..., D:]`` = V, slot = block * block_size + offset) and uses plain torch, so masks can
be applied on any CPU, and a request whose blocks are consecutive (the usual case) is
attended in place, without gathering its K/V.

State without request identity (vLLM's attention metadata has none): a ``prune_level``
byte per KV slot (255 = never pruned), reset when layer 0 writes the slot, set by the
loop's decisions. It survives batching and reordering because slots are physical; a
preempted request is re-prefilled and decided again.
"""
from __future__ import annotations

import torch
from torch import Tensor
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_vtprune.models.in_llm import NEVER, STEP


class VTPruneCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # replaces it (an AttentionBackendEnum member name is required)

    @staticmethod
    def get_impl_cls():
        return MaskedCPUAttentionImpl


def _query_rows(n: int) -> Tensor:
    """The step's row of each query row (the loop may have taken pruned rows out)."""
    return torch.arange(n, device=STEP.device) if STEP.rows is None else STEP.rows


def _slots(kv_cache: Tensor) -> Tensor:
    """The layer's cache buffer as [slot, kv head, 2 * head_size]."""
    if not kv_cache.is_contiguous():
        raise RuntimeError("vtprune: the masked attention needs a contiguous KV cache buffer")
    num_blocks, heads, block_size, width = kv_cache.shape
    return kv_cache.view(num_blocks * block_size, heads, width)


def _request_keys(r: int, blocks: Tensor, seq_len: int, block_size: int):
    """(KV slot of each of the request's tokens, first slot when they are consecutive
    else None), once per step: every layer of the step reads the same slots."""
    key = (r, seq_len)
    cached = STEP.keys.get(key)
    if cached is None:
        num_blocks = -(-seq_len // block_size)
        used = blocks[:num_blocks].long()
        slots = (used[:, None] * block_size
                 + torch.arange(block_size, device=used.device)).flatten()[:seq_len]
        consecutive = num_blocks == 1 or bool((used[1:] - used[:-1] == 1).all())
        cached = STEP.keys[key] = (slots, int(slots[0]) if consecutive else None)
    return cached


class MaskedCPUAttentionImpl(CPUAttentionBackendImpl):
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        num_blocks, _, block_size, _ = kv_cache.shape
        if STEP.rows is None:
            slots = slot_mapping[:key.shape[0]].long()
            key, value = key[:len(slots)], value[:len(slots)]
        else:
            slots = slot_mapping[STEP.rows].long()
        valid = slots >= 0
        slots, key, value = slots[valid], key[valid], value[valid]
        d = self.head_size
        flat = _slots(kv_cache)
        flat[slots, :, :d] = key.view(-1, self.num_kv_heads, d).to(kv_cache.dtype)
        flat[slots, :, d:] = value.view(-1, self.num_kv_heads, d).to(kv_cache.dtype)
        if extract_layer_index(layer.layer_name) == 0:
            STEP.prune_levels(num_blocks * block_size)[slots] = NEVER  # a fresh token

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None:
            return output
        num_blocks, _, block_size, _ = kv_cache.shape
        levels = STEP.prune_levels(num_blocks * block_size)
        layer_idx = extract_layer_index(layer.layer_name)
        if layer_idx == 0:
            STEP.keys = {}  # a new step: its block tables may differ from the last one's
        n = query.shape[0]
        rows = _query_rows(n)
        starts = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        out = output[:n].view(n, self.num_heads, self.head_size)
        capture = STEP.capture.get(layer_idx, ())
        for r in range(len(seq_lens)):
            q0, q1 = starts[r], starts[r + 1]
            if STEP.rows is None:
                mine = slice(q0, q1)
                qpos = torch.arange(seq_lens[r] - (q1 - q0), seq_lens[r], device=query.device)
            else:
                mine = torch.nonzero((rows >= q0) & (rows < q1)).flatten()
                qpos = seq_lens[r] - (q1 - q0) + (rows[mine] - q0)
            if q1 <= q0 or qpos.numel() == 0:
                continue
            keys = _request_keys(r, attn_metadata.block_table[r], seq_lens[r], block_size)
            attended, probs = self._attend(query[mine], kv_cache, keys, seq_lens[r], qpos,
                                           levels, layer_idx, r in capture)
            out[mine] = attended
            if probs is not None:
                STEP.probs[r] = probs
        return output

    def _attend(self, q, kv_cache, keys, seq_len, qpos, levels, layer_idx, keep_probs):
        slots, start = keys
        flat = _slots(kv_cache)
        if start is not None:
            kv = flat[start:start + seq_len]  # in place: consecutive blocks
        else:
            kv = flat.index_select(0, slots)
        kv = kv.transpose(0, 1)  # [H_kv, S, 2D]
        keys, values = kv[..., :self.head_size], kv[..., self.head_size:]
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            keys = keys.repeat_interleave(rep, dim=0)
            values = values.repeat_interleave(rep, dim=0)
        visible = levels[slots] > layer_idx
        qh = q.transpose(0, 1).to(keys.dtype)  # [H, Q, D]
        if not keep_probs and qpos.numel() == 1 and bool(visible.all()):
            # a decode row that no pruning hides anything from: plain attention
            out = torch.nn.functional.scaled_dot_product_attention(qh, keys, values,
                                                                   scale=self.scale)
            return out.transpose(0, 1).to(q.dtype), None
        pos = torch.arange(seq_len, device=qpos.device)
        allowed = (pos[None, :] <= qpos[:, None]) & visible[None, :]
        allowed |= pos[None, :] == qpos[:, None]  # a token always sees itself
        if not keep_probs:
            out = torch.nn.functional.scaled_dot_product_attention(
                qh, keys, values, attn_mask=allowed, scale=self.scale)
            return out.transpose(0, 1).to(q.dtype), None
        scores = (qh.float() @ keys.float().transpose(1, 2)) * self.scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out = (probs @ values.float()).transpose(0, 1).to(q.dtype)
        return out, probs
