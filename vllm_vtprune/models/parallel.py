"""Tensor parallelism for pruning: every rank takes the same decision.

Under ``--tensor-parallel-size N`` vLLM splits each CLIP attention layer's heads across
the ranks (``mm_encoder_tp_mode=weights``, LLaVA's only mode), and the layers' output
projections all-reduce, so every rank holds the full hidden states but only its own
heads' attention. A probe (CLS attention, keys, DCP's full attention and values) is
therefore completed across the ranks before any method reads it: per-head tensors are
all-gathered in head order (QKVParallelLinear gives rank r the r-th contiguous block of
heads), head averages all-reduced. Each rank then runs the same deterministic selection
on the same numbers.

An all-reduce is not promised to give every rank bitwise the same sum on every backend,
and a greedy selection can flip on a last bit; so the tokens each rank hands the LLM are
broadcast from rank 0 (:func:`from_first_rank`), which makes the LLM inputs identical
whatever the reductions did, at the cost of one [K, D] broadcast per image. Inside the
LLM the same holds for each decoder layer: a decision reads the attention of every head (:func:`gather_heads`) and every rank applies rank 0's verdict
(:func:`agree_verdict`), so the prune levels written into the KV slots, the rows taken
out of the batch and the merged hidden states are alike on every rank. A branch that
decides whether a rank runs a collective (DCP's switch to TATCS projects tokens through
the row-parallel projector) is taken on rank 0's answer (:func:`agree`): ranks running
different collectives would wait for each other forever.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_vtprune.pipeline import PrunedImage, Probe


def tp_size() -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def all_heads(probe: Probe) -> Probe:
    """This rank's probe completed over every rank's heads; ``context`` (the attention
    output the layer's row-parallel projection consumes) stays this rank's."""
    size = tp_size()
    if size == 1:
        return probe
    from vllm.distributed import tensor_model_parallel_all_reduce

    def gather(x):
        return None if x is None else gather_heads(x)

    attn = probe.attn
    if attn is not None:  # a mean over this rank's heads -> the mean over all heads
        local = probe.keys.shape[0]
        attn = tensor_model_parallel_all_reduce((attn * local).contiguous()) / (local * size)
    return dataclasses.replace(probe, cls_attn=gather(probe.cls_attn), keys=gather(probe.keys),
                               attn=attn, values=gather(probe.values))


def gather_heads(probs: torch.Tensor) -> torch.Tensor:
    """A decoder layer's attention of this rank's heads [H_local, ...] -> every head's
    [H, ...], in head order."""
    if tp_size() == 1:
        return probs
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(probs.contiguous(), dim=0)


def agree_verdict(verdict):
    """Rank 0's :class:`vllm_vtprune.llm_loop.Verdict` (kept rows, and the merged hidden
    states where the method gives them) on every rank."""
    if tp_size() == 1:
        return verdict
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    first = tp_rank() == 0
    dev = verdict.keep.device
    n = int(group.broadcast(torch.tensor([len(verdict.keep)], device=dev), src=0).item())
    keep = (verdict.keep.to(torch.int64).contiguous() if first
            else torch.empty(n, dtype=torch.int64, device=dev))
    keep = group.broadcast(keep, src=0)
    hidden = None
    if agree(verdict.hidden is not None):
        like = verdict.hidden
        hidden = like.contiguous() if first else like.new_empty((n, like.shape[1]))
        hidden = group.broadcast(hidden, src=0)
    return dataclasses.replace(verdict, keep=keep, hidden=hidden)


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if tp_size() == 1:
        return flag
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    return bool(group.broadcast(torch.tensor([int(flag)], device=group.device), src=0).item())


def from_first_rank(image: PrunedImage) -> PrunedImage:
    """Rank 0's tokens and origins on every rank (see the module docstring)."""
    if tp_size() == 1:
        return image
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    tokens = group.broadcast(image.tokens.contiguous(), src=0)
    origins = group.broadcast(image.origins.to(torch.int64).contiguous(), src=0)
    kept = origins if image.kept is not None else None
    return dataclasses.replace(image, tokens=tokens, origins=origins, kept=kept)
