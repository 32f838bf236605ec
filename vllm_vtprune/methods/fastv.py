"""FastV baseline: attention-based visual token pruning inside the LLM.

Selection rule as FastV's code does it (Chen et al., "An Image is Worth 1/2 Tokens After
Layer 2", ECCV 2024, arXiv 2403.06764): at
decoder layer K (2 or 3), take the previous layer's softmax attention, average it over
heads, take the row of the last prompt token restricted to the image-token columns,
and keep the top-k image tokens.  Kept indices are returned ascending so that the
original position ids can be kept; ties go to the lowest index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_vtprune.registry import Method, Option, Where, int_ge

from ._common import (check_budget, check_finite, check_vector, layer_counts, scale_layers,
                      stable_topk)

__all__ = ["last_token_image_attention", "select"]


def last_token_image_attention(attn: Tensor, image_start: int, image_end: int) -> Tensor:
    """Head-averaged attention of the last query to image keys ``[image_start, image_end)``.

    ``attn``: softmax attention weights [H, Q, K] (or [Q, K], already head-averaged).
    """
    a = check_finite(attn, "attn")
    if a.dim() == 2:
        a = a.unsqueeze(0)
    if a.dim() != 3:
        raise ValueError(f"attn must be [H, Q, K] or [Q, K], got shape {tuple(attn.shape)}")
    if not 0 <= image_start < image_end <= a.shape[-1]:
        raise ValueError(
            f"image span [{image_start}, {image_end}) outside key length {a.shape[-1]}"
        )
    return a[:, -1, image_start:image_end].mean(dim=0)


def select(attn_to_image: Tensor, budget: int) -> Tensor:
    """Indices (int64, ascending) of the ``min(budget, N)`` most-attended image tokens.

    ``attn_to_image``: [N] head-averaged attention of the last prompt token to the N
    image tokens (see :func:`last_token_image_attention`), or [H, N] per head
    (averaged here).
    """
    if attn_to_image.dim() == 2:
        scores = check_finite(attn_to_image, "attn_to_image").mean(dim=0)
        if scores.numel() == 0:
            raise ValueError("attn_to_image is empty")
    else:
        scores = check_vector(attn_to_image, name="attn_to_image")
    k = min(check_budget(budget), scores.shape[0])
    return stable_topk(scores, k).to(attn_to_image.device)


#: FastV's K for LLaVA-1.5-7B's 32 layers; other depths scale it.
REFERENCE_LAYER, REFERENCE_DEPTH = 2, 32


def decision_layer(option: int | None, num_layers: int) -> int:
    """The layer whose input is pruned (the attention of the layer before it ranks):
    ``layer=K`` as given, else K=2 scaled from 32 layers to ``num_layers`` (at least 1)."""
    layer = option if option is not None else scale_layers(
        (REFERENCE_LAYER,), num_layers, REFERENCE_DEPTH)[0]
    if not 1 <= layer < num_layers:
        raise ValueError(f"fastv layer={layer} is outside the model's decoder; accepted: "
                         f"1 to {num_layers - 1}")
    return layer


def decision(image_spans, budget_for):
    """FastV's rule at the decision layer: the previous layer's attention of the last
    prompt token, averaged over heads, ranks each image's tokens; each image keeps its
    budget (``budget_for(num_tokens)``), every text token stays.

    Returns ``decide(view) -> Verdict`` (:mod:`vllm_vtprune.llm_loop`); ``image_spans``
    are the [start, end) prompt positions of each image.
    """
    from vllm_vtprune.llm_loop import Verdict

    def decide(view):
        probs, rows = view.probs, view.rows
        keep = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
        for start, end in image_spans:
            cols = torch.nonzero((rows >= start) & (rows < end)).flatten()
            if cols.numel() == 0:
                continue
            chosen = select(probs[:, -1, cols], budget_for(end - start))
            keep[cols] = False
            keep[cols[chosen]] = True
        return Verdict(torch.nonzero(keep).flatten())

    return decide


def llm_plan(spec, image_spans, num_layers: int, full_tokens: int):
    """The :class:`vllm_vtprune.llm_loop.Plan` of one request: one decision layer."""
    from vllm_vtprune.llm_loop import Plan

    layer = decision_layer(spec.value("layer"), num_layers)
    sizes = [end - start for start, end in image_spans]
    counts = layer_counts(num_layers, sum(sizes),
                          {layer: sum(spec.tokens_for(n) for n in sizes)})
    return Plan({layer: decision(image_spans, spec.tokens_for)}, visual_counts=counts)


METHOD = Method(
    name="fastv",
    where=Where.INSIDE_LLM,
    summary="top-k image tokens by the last prompt token's attention at decoder layer K",
    paper='Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play '
          'Inference Acceleration for Large Vision-Language Models", ECCV 2024, arXiv 2403.06764',
    options=(Option("layer", int_ge(1), None,
                    "decoder layer K whose input is pruned (default 2 of 32, scaled by depth)"),),
    needs=frozenset({"llm_attention"}),
    llm_plan=llm_plan,
)
