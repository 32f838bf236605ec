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
    return _snap(1.0 - cosine_matrix(x))


def _snap(d: Tensor) -> Tensor:
    return torch.round(d, decimals=_TIE_DECIMALS)


def select(tokens: Tensor, budget: int) -> Tensor:
    """Indices (int64, ascending) of ``min(budget, N)`` tokens by greedy max-min diversity.

    ``tokens``: [N, D] post-projector embeddings (any float dtype; computed in fp32).
    The first pick needs every token's nearest neighbour, so the N x N cosine matrix is
    computed once (one matmul); the greedy steps then read one row each. ``1 - c`` and the
    snapping are both monotone, so they are applied to the N-vectors the rule reads
    (nearest-neighbour similarities, one row per pick) instead of the whole matrix: the
    same values as :func:`cosine_distance`'s entries, at N instead of N^2 work.
    """
    x = check_tokens(tokens)
    k = min(check_budget(budget), x.shape[0])
    n = x.shape[0]
    if k == n:
        return torch.arange(n, dtype=torch.long, device=tokens.device)
    cos = cosine_matrix(x)
    # First pick: the token farthest from its nearest neighbour (largest 1 - max cos).
    cos.fill_diagonal_(float("-inf"))
    first = int(torch.argmax(_snap(1.0 - cos.max(dim=1).values)))
    chosen = [first]
    taken = torch.zeros(n, dtype=torch.bool, device=cos.device)
    taken[first] = True
    min_dist = _snap(1.0 - cos[first])
    for _ in range(k - 1):
        nxt = int(torch.argmax(min_dist.masked_fill(taken, float("-inf"))))
        chosen.append(nxt)
        taken[nxt] = True
        min_dist = torch.minimum(min_dist, _snap(1.0 - cos[nxt]))
    return torch.sort(torch.tensor(chosen, dtype=torch.long, device=tokens.device)).values


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
