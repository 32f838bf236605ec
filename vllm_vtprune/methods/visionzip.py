"""VisionZip baseline: dominant + contextual visual tokens from the vision encoder.

Selection rule as VisionZip's code does it (Yang et al., "VisionZip: Longer is Better
but Not Necessary in Vision Language Models", CVPR 2025, arXiv 2412.04467),
on vision-encoder layer -2 (CLS included at row 0):

* dominant: CLS attention to patches summed over heads; the top patches (plus CLS when
  it is kept) are taken as they are;
* contextual: the keys of that layer averaged over heads are the similarity metric
  (L2-normalised); of the remaining patches, targets sit at a uniform stride
  (``step = max(1, N_rem // C)``, first C); every other remaining patch joins its most
  cosine-similar target; a contextual token is ``target + mean(assigned)``.

Output order: ``[CLS?, dominant..., contextual...]`` (dominant in original order,
contextual in target order), ready for the projector.

Budget accounting: LLaVA's "default" feature strategy drops CLS before the projector,
so with ``keep_cls=False`` all ``dominant`` slots are patches; with ``keep_cls=True`` the
CLS token takes one dominant slot (top ``dominant - 1`` patches + CLS).  Either way the
output has exactly ``min(budget, N_patches [+1])`` rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_vtprune.registry import Method, Option, Where, int_ge

from ._common import EPS, check_budget, check_finite, check_tokens, segment_mean, stable_topk

__all__ = ["split_budget", "dominant_indices", "contextual_merge", "select"]

# VisionZip's published LLaVA-1.5 settings; other budgets keep the same 54:10 ratio.
_PRESETS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}
_CONTEXTUAL_FRACTION = 10 / 64


def split_budget(budget: int, contextual: int | None = None) -> tuple[int, int]:
    """(dominant, contextual) counts for a budget: 54+10, 108+20, 162+30, else 54:10.

    ``contextual`` overrides the proportional rule; it is clipped to ``budget - 1``
    since at least one dominant token is always kept.
    """
    budget = check_budget(budget)
    if contextual is None:
        if budget in _PRESETS:
            return _PRESETS[budget]
        contextual = int(round(budget * _CONTEXTUAL_FRACTION))
    if contextual < 0:
        raise ValueError(f"contextual must be >= 0, got {contextual}")
    contextual = min(contextual, budget - 1)
    return budget - contextual, contextual


def _cls_scores(cls_attn: Tensor, num_rows: int) -> Tensor:
    """CLS-to-patch attention [N_patches], summed over heads if given per head."""
    a = check_finite(cls_attn, "cls_attn")
    if a.dim() == 2:
        a = a.sum(dim=0)
    if a.dim() != 1 or a.shape[0] not in (num_rows, num_rows - 1):
        raise ValueError(
            f"cls_attn must be [H, N] or [N] with N = {num_rows} (incl. CLS) or "
            f"{num_rows - 1} (patches only), got shape {tuple(cls_attn.shape)}"
        )
    return a[1:] if a.shape[0] == num_rows else a


def dominant_indices(cls_attn: Tensor, num_rows: int, dominant: int, keep_cls: bool) -> Tensor:
    """Row indices (into the CLS-first hidden states) of the dominant tokens, ascending.

    CLS (row 0) is included when ``keep_cls``; it then uses one of the ``dominant`` slots.
    """
    scores = _cls_scores(cls_attn, num_rows)
    n_patches = num_rows - 1
    num_patches = min(dominant - 1 if keep_cls else dominant, n_patches)
    idx = stable_topk(scores, max(num_patches, 0)) + 1
    if keep_cls:
        idx = torch.cat([torch.zeros(1, dtype=torch.long, device=idx.device), idx])
    return idx


def target_rows(num_rows: int, contextual: int, device=None) -> Tensor:
    """Rows ``0, step, 2*step, ...`` (first ``contextual``), ``step = max(1, R // C)``."""
    step = max(1, num_rows // contextual)
    return torch.arange(0, num_rows, step, device=device)[:contextual]


def contextual_merge(hidden: Tensor, keys: Tensor, contextual: int) -> Tensor:
    """Merge ``hidden`` [R, C] into ``contextual`` tokens using ``keys`` [R, Dk] as metric.

    Targets: rows ``0, step, 2*step, ...`` (first ``contextual``) with
    ``step = max(1, R // contextual)``; each non-target row is added to the mean of
    its most cosine-similar target (ties to the lowest target).  A zero key has
    cosine 0 to every target (VisionZip divides by the raw norm, which would give NaN).
    """
    r = hidden.shape[0]
    contextual = min(contextual, r)
    if contextual == 0:
        return hidden.new_zeros((0, hidden.shape[1]))
    targets = target_rows(r, contextual, keys.device)
    is_target = torch.zeros(r, dtype=torch.bool, device=keys.device)
    is_target[targets] = True
    metric = keys / keys.norm(dim=-1, keepdim=True).clamp_min(EPS)
    sim = metric[~is_target] @ metric[targets].T
    merged = hidden[targets].clone()
    if sim.shape[0] > 0:
        means, _ = segment_mean(hidden[~is_target], sim.argmax(dim=1), contextual)
        merged = merged + means
    return merged


def select(
    hidden: Tensor,
    cls_attn: Tensor,
    keys: Tensor,
    budget: int,
    keep_cls: bool = False,
    contextual: int | None = None,
) -> tuple[Tensor, Tensor]:
    """VisionZip token selection; returns ``(tokens, dominant_rows)``.

    Args:
        hidden: [N+1, C] layer -2 hidden states, CLS at row 0.
        cls_attn: CLS-row attention of that layer, [H, N+1] / [H, N] (summed over heads
            here) or [N+1] / [N] already summed.
        keys: [N+1, Dk] keys of that layer averaged over heads.
        budget: number of output tokens (CLS counted when ``keep_cls``).
        keep_cls: keep CLS as the first output token (it takes one dominant slot).
        contextual: number of contextual tokens; default from :func:`split_budget`.

    Returns:
        tokens: [min(budget, N [+1]), C] in order [CLS?, dominant..., contextual...],
            in ``hidden``'s dtype (computed in fp32).
        dominant_rows: int64 row indices into ``hidden`` of the dominant tokens
            (ascending, 0 = CLS).
    """
    h = check_tokens(hidden, "hidden")
    k = check_tokens(keys, "keys")
    if h.shape[0] < 2:
        raise ValueError("hidden must hold CLS plus at least one patch token")
    if k.shape[0] != h.shape[0]:
        raise ValueError(f"keys has {k.shape[0]} rows, hidden has {h.shape[0]}")
    available = h.shape[0] if keep_cls else h.shape[0] - 1
    budget = min(check_budget(budget), available)
    if keep_cls and budget == 1:
        dom, ctx = 1, 0
    else:
        dom, ctx = split_budget(budget, contextual)
    dom_rows = dominant_indices(cls_attn, h.shape[0], dom, keep_cls)
    rest = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    rest[0] = False
    rest[dom_rows] = False
    ctx_tokens = contextual_merge(h[rest], k[rest], ctx)
    out = torch.cat([h[dom_rows], ctx_tokens], dim=0)
    return out.to(device=hidden.device, dtype=hidden.dtype), dom_rows.to(hidden.device)


def prune(ctx) -> "PrunedImage":
    """Served entry point on the feature layer (LLaVA's layer -2), CLS dropped.

    A tower without CLS (Qwen2-VL) ranks its tokens by the attention each receives,
    averaged over heads and queries (``Probe.received``): the stand-in for CLS attention
    that VisPruner's authors give for VisionZip-style selection on Qwen2.5-VL (a row
    standing in for CLS is put before the tokens and never kept). A contextual token
    stands at its target's patch (its position for M-RoPE families).
    """
    from vllm_vtprune.pipeline import PrunedImage

    contextual = ctx.option("contextual")
    keys = ctx.probe.keys.float().mean(0)
    hidden, scores = ctx.hidden, ctx.probe.cls_attn
    if ctx.tower.prefix == 0 and ctx.probe.received is not None:
        hidden, keys = (torch.cat([x.new_zeros(1, x.shape[1]), x]) for x in (hidden, keys))
        scores = ctx.probe.received.float()
    elif ctx.tower.prefix != 1:
        raise ValueError("vtprune method 'visionzip' needs a CLS token in the vision tower")
    tokens, dom_rows = select(hidden, scores, keys, ctx.budget, keep_cls=False,
                              contextual=contextual)
    return PrunedImage.merged(ctx.project(tokens.to(ctx.hidden.dtype)),
                              _origins(hidden.shape[0], dom_rows, ctx.budget, contextual))


def _origins(num_rows: int, dom_rows: Tensor, budget: int, contextual: int | None) -> Tensor:
    """Patch index of every output token: the dominant patches, then the targets."""
    _, ctx_count = split_budget(min(budget, num_rows - 1), contextual)
    rest = torch.ones(num_rows, dtype=torch.bool, device="cpu")
    rest[0] = False
    rest[dom_rows.cpu()] = False
    rest_rows = torch.nonzero(rest).flatten()
    ctx_count = min(ctx_count, rest_rows.shape[0])
    targets = rest_rows[target_rows(rest_rows.shape[0], ctx_count, "cpu")] if ctx_count else rest_rows[:0]
    return torch.cat([dom_rows.cpu(), targets]) - 1


METHOD = Method(
    name="visionzip",
    where=Where.ENCODER_OUTPUT,
    summary="dominant tokens by CLS attention plus contextual merges (encoder layer -2)",
    paper='Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language '
          'Models", CVPR 2025, arXiv 2412.04467',
    options=(Option("contextual", int_ge(0), None,
                    "contextual tokens (default: VisionZip's 54:10 split of the budget)"),),
    needs=frozenset({"cls_attention", "keys"}),
    prune=prune,
)
