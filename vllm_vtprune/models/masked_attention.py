"""Masked decoder attention for pruning inside the LLM on vLLM's CPU backend.

Installed (``register_backend(CPU_ATTN, ...)``) only by a model served with a method that
acts inside the LLM. From a decision layer ``l`` on, a visual token the request prunes is
attended by no query but its own, for the rest of the prefill and every decode step
(cumulative), which on kept tokens equals removing the pruned rows
(:mod:`vllm_vtprune.llm_loop`, ``mode="mask"``, tested equal to ``"remove"``).

Why a layout of its own: the native CPU kernels store K/V in an ISA-specific layout
(column-major K on AVX, tile-packed on AMX) that only their C++ reads; this backend
writes and reads every decoder layer's K/V with plain torch indexing
(``kv_cache[block, head, offset, :D]`` = K, ``[..., D:]`` = V), so masks can be applied
on any CPU.

State without request identity (vLLM's attention metadata has none): a ``prune_level``
byte per KV slot (255 = never pruned), reset when layer 0 writes the slot, set by the
decision layer for the slots of pruned image tokens. It survives batching and reordering
because slots are physical; a preempted request is re-prefilled and decided again.
Which tokens of a step are image tokens comes from the model's ``embed_input_ids``
(:data:`STEP`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

NEVER = 255


@dataclasses.dataclass
class StepState:
    """The served spec (set when the model is built) and, per step, which tokens are
    image tokens (set by the model's ``embed_input_ids``); read by the decision layer."""

    decide_layer: int = -1  # the first layer that no longer sees pruned tokens
    #: image spans -> {decide_layer: decide}, the served method's ``llm_plan``
    plan_for: Callable[[list[tuple[int, int]]], dict] | None = None
    tokens_per_image: int = 0
    image_mask: Tensor | None = None  # [num_tokens] bool, batch order

    def configure(self, decide_layer: int, plan_for, tokens_per_image: int) -> None:
        self.decide_layer, self.plan_for = decide_layer, plan_for
        self.tokens_per_image, self.image_mask = tokens_per_image, None


STEP = StepState()
_LEVELS: dict[tuple, Tensor] = {}


def prune_levels(num_slots: int) -> Tensor:
    """The per-slot prune level table of this engine's KV cache."""
    key = (num_slots,)
    if key not in _LEVELS:
        _LEVELS.clear()
        _LEVELS[key] = torch.full((num_slots,), NEVER, dtype=torch.uint8)
    return _LEVELS[key]


class VTPruneCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # replaces it (an AttentionBackendEnum member name is required)

    @staticmethod
    def get_impl_cls():
        return MaskedCPUAttentionImpl


class MaskedCPUAttentionImpl(CPUAttentionBackendImpl):
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        num_blocks, _, block_size, _ = kv_cache.shape
        slots = slot_mapping[:key.shape[0]].long()
        valid = slots >= 0
        slots, key, value = slots[valid], key[:len(valid)][valid], value[:len(valid)][valid]
        block, offset = slots // block_size, slots % block_size
        d = self.head_size
        kv_cache[block, :, offset, :d] = key.to(kv_cache.dtype)
        kv_cache[block, :, offset, d:] = value.to(kv_cache.dtype)
        if extract_layer_index(layer.layer_name) == 0:
            prune_levels(num_blocks * block_size)[slots] = NEVER  # a fresh token

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None:
            return output
        num_blocks, _, block_size, _ = kv_cache.shape
        levels = prune_levels(num_blocks * block_size)
        layer_idx = extract_layer_index(layer.layer_name)
        n = attn_metadata.num_actual_tokens
        starts = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        out = output[:n].view(n, self.num_heads, self.head_size)
        for r in range(len(seq_lens)):
            q0, q1 = starts[r], starts[r + 1]
            if q1 > q0:
                out[q0:q1] = self._attend(query[q0:q1], kv_cache, attn_metadata.block_table[r],
                                          seq_lens[r], levels, layer_idx, (q0, q1))
        return output

    def _attend(self, q, kv_cache, blocks, seq_len, levels, layer_idx, rows) -> Tensor:
        block_size = kv_cache.shape[2]
        pos = torch.arange(seq_len)
        slots = blocks[pos // block_size].long() * block_size + pos % block_size
        keys = kv_cache[slots // block_size, :, slots % block_size, :self.head_size]
        values = kv_cache[slots // block_size, :, slots % block_size, self.head_size:]
        rep = self.num_heads // self.num_kv_heads
        keys = keys.transpose(0, 1).repeat_interleave(rep, dim=0).float()  # [H, S, D]
        values = values.transpose(0, 1).repeat_interleave(rep, dim=0).float()
        qlen = q.shape[0]
        qpos = torch.arange(seq_len - qlen, seq_len)
        allowed = (pos[None, :] <= qpos[:, None]) & (levels[slots][None, :] > layer_idx)
        allowed |= pos[None, :] == qpos[:, None]  # a token always sees itself
        scores = (q.transpose(0, 1).float() @ keys.transpose(1, 2)) * self.scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        if layer_idx == STEP.decide_layer - 1 and qlen == seq_len:
            self._decide(probs, slots, levels, rows)
        return (probs @ values).transpose(0, 1).to(q.dtype)

    def _decide(self, probs, slots, levels, rows) -> None:
        """The served method's decision (its ``llm_plan``, the reference path's rule) on a
        whole-prompt prefill, from this layer's attention (layer K-1); what it drops is
        pruned from layer K on."""
        from vllm_vtprune.llm_loop import image_spans

        mask = STEP.image_mask
        if mask is None or STEP.plan_for is None or mask.shape[0] < rows[1]:
            return
        spans = image_spans(mask[rows[0]:rows[1]].cpu(), STEP.tokens_per_image)
        if not spans:
            return
        local = torch.arange(rows[1] - rows[0])
        keep = torch.zeros(len(local), dtype=torch.bool)
        keep[STEP.plan_for(spans)[STEP.decide_layer](probs, local)] = True
        levels[slots[~keep]] = STEP.decide_layer  # only image tokens can be dropped
