"""DivPrune: diversity-based visual token selection (max-min distance).

Implements the selection rule of DivPrune (Alvar et al., "DivPrune: Diversity-based
Visual Token Pruning for Large Multimodal Models", CVPR 2025, arXiv 2503.02175): with d(i, j) = 1 - cos(x_i, x_j), the first token is
argmax_j min_{i != j} d(i, j); every further token maximises its minimum distance to
the already-selected set (a greedy solution of the Max-Min Diversity Problem).
Ties go to the lowest index; kept indices are returned in ascending (original) order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_vtprune.registry import Method, Where

from ._common import check_budget, check_tokens, cosine_matrix

__all__ = ["select", "cosine_distance"]

# Distances are snapped to this grid so that ties produced by duplicated or collinear
# tokens (equal up to fp rounding noise) resolve to the lowest index independently of
# the summation order of the matmul that produced them.
_TIE_DECIMALS = 6


def cosine_distance(x: Tensor) -> Tensor:
    """d(i, j) = 1 - cos(x_i, x_j) for all pairs (zero vectors: cos = 0, so d = 1)."""
    d = 1.0 - cosine_matrix(x)
    return torch.round(d, decimals=_TIE_DECIMALS)


def select(tokens: Tensor, budget: int) -> Tensor:
    """Indices (int64, ascending) of ``min(budget, N)`` tokens by greedy max-min diversity.

    ``tokens``: [N, D] post-projector embeddings (any float dtype; computed in fp32).
    """
    x = check_tokens(tokens)
    k = min(check_budget(budget), x.shape[0])
    n = x.shape[0]
    if k == n:
        return torch.arange(n, dtype=torch.long, device=tokens.device)
    d = cosine_distance(x)
    # First pick: the token farthest from its nearest neighbour.
    off_diag = d.masked_fill(torch.eye(n, dtype=torch.bool, device=d.device), float("inf"))
    first = int(torch.argmax(off_diag.min(dim=1).values))
    chosen = [first]
    min_dist = d[first].clone()
    taken = torch.zeros(n, dtype=torch.bool, device=d.device)
    taken[first] = True
    for _ in range(k - 1):
        nxt = int(torch.argmax(min_dist.masked_fill(taken, float("-inf"))))
        chosen.append(nxt)
        taken[nxt] = True
        min_dist = torch.minimum(min_dist, d[nxt])
    return torch.sort(torch.tensor(chosen, dtype=torch.long)).values.to(tokens.device)


def prune(ctx) -> "PrunedImage":
    """Served entry point: max-min diversity on the projector outputs."""
    from vllm_vtprune.pipeline import PrunedImage

    tokens = ctx.project(ctx.patches)
    idx = select(tokens, ctx.budget)
    return PrunedImage.subset(tokens[idx], idx)


METHOD = Method(
    name="divprune",
    where=Where.PROJECTOR_OUTPUT,
    summary="greedy max-min cosine diversity of the projector outputs",
    paper='Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large '
          'Multimodal Models", CVPR 2025, arXiv 2503.02175',
    prune=prune,
)
