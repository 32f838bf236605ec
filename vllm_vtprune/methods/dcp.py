"""DCP-Prune: Anchor-Context Graph Recovery (ACGR) + Text-Aware Token Cluster Selection.

Implements Xue et al., "DCP-Prune: Ultra-Low Token Pruning with Distribution Consistency
Preservation" (no arXiv id in the published text; cited by title):

* :func:`kappa` -- distribution-consistency metric, Eq. 1 / Eq. 24;
* :func:`cls_score`, :func:`cosine_score`, :func:`variation_score`, :func:`ablation_score`
  -- the four ACGR importance terms, Eqs. 10-11, 12-13, 14-17, 22-23; their sum, Eq. 2/9,
  is :func:`importance_scores`;
* :func:`edge_weights` / :func:`graph_update` -- context-to-anchor graph, Eqs. 3-4;
* :func:`greedy_representative_init`, :func:`text_aware_similarity`,
  :func:`tatcs_select` -- TATCS, Eqs. 5-8 plus cluster reselection;
* :func:`acgr_stage` (one progressive stage), :func:`final_stage` (ACGR, then TATCS when
  kappa > delta) and :func:`schedule` (per-stage target counts, Sec. 4.1).

Choices where the text is silent or ambiguous (each repeated where it applies):

* variances in kappa are population variances (a single kept token has Tr(Sigma) = 0);
* Eq. 4's normalised weights drop edges with e_ij <= 0 (negative cosine): normalising
  signed weights by a sum that can be ~0 makes the update explode; an anchor whose
  neighbours are all non-positive is left unchanged;
* Eq. 5's max over an empty selected set is 0; its "normalised CLS attention"
  a_hat is Eq. 11's sum-normalisation; the mean over U includes the candidate itself;
* TATCS refines the centers for ``iters`` rounds (default 3; the paper does not say how
  many), an empty cluster keeps its previous center, and a cluster that is still empty at
  reselection takes the unused token most similar (Eq. 6) to its center;
* several text vectors (e.g. one per noun) are averaged into the single t of Eq. 6;
* s_abl (Eq. 23) is not normalised in the paper and is used as written.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from vllm_vtprune.registry import Method, Option, Where, float_ge0, float_pos, int_ge

from ._common import (EPS, check_budget, check_finite, check_tokens, cosine_matrix,
                      segment_mean, stable_topk)

__all__ = [
    "kappa",
    "cls_score",
    "cosine_score",
    "variation_score",
    "ablation_score",
    "importance_scores",
    "partition",
    "grid_positions",
    "edge_weights",
    "graph_update",
    "acgr_stage",
    "greedy_representative_init",
    "text_aware_similarity",
    "tatcs_select",
    "final_stage",
    "schedule",
]

K_N = 5
TAU = 10.0
ALPHA = 0.1
DELTA = 0.1
TATCS_ITERS = 3  # center refinements (the paper does not say how many)


# --- Eq. 1 / 24 --------------------------------------------------------------------

def _dispersion(x: Tensor) -> Tensor:
    """Tr(Sigma) + d * Var(mu) of a token set (population statistics)."""
    trace = x.var(dim=0, unbiased=False).sum()
    mu = x.mean(dim=0)
    return trace + x.shape[1] * mu.var(unbiased=False)


def kappa(kept: Tensor, full: Tensor) -> float:
    """kappa = |D(X_k, X_f) - 1| with D the dispersion ratio of Eq. 1 / Eq. 24.

    When the full set has zero dispersion (all tokens equal and constant across
    channels) kappa is 0 if the kept set has none either, else +inf.
    """
    k = check_tokens(kept, "kept")
    f = check_tokens(full, "full")
    if k.shape[1] != f.shape[1]:
        raise ValueError(f"kept has dim {k.shape[1]}, full has dim {f.shape[1]}")
    return _kappa(k, f)


def _kappa(k: Tensor, f: Tensor) -> float:
    num = float(_dispersion(k.double()))
    den = float(_dispersion(f.double()))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return abs(num / den - 1.0)


# --- Eqs. 9-23: ACGR importance ------------------------------------------------------

def cls_score(cls_attn: Tensor) -> Tensor:
    """s_cls (Eqs. 10-11): head-averaged CLS attention to patches, sum-normalised.

    ``cls_attn``: [H, M] per head or [M] already averaged (patch columns only).
    """
    a = check_finite(cls_attn, "cls_attn")
    if a.dim() not in (1, 2):
        raise ValueError(f"cls_attn must be [H, M] or [M], got shape {tuple(cls_attn.shape)}")
    return _cls_score(a)


def _cls_score(a: Tensor) -> Tensor:
    a = a.mean(dim=0) if a.dim() == 2 else a
    return a / (a.sum() + EPS)


def cosine_score(x: Tensor) -> Tensor:
    """s_cos (Eqs. 12-13): 1 - mean cosine to the other tokens, sum-normalised.

    With a single token the mean over no others is taken as 0 (c = 1).
    """
    return _cosine_score(check_tokens(x))


def _cosine_score(x: Tensor) -> Tensor:
    # sum_j cos(x_i, x_j) = x^_i . sum_j x^_j: O(M d) instead of the O(M^2 d) matrix
    m = x.shape[0]
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)
    off = xn @ xn.sum(dim=0) - (xn * xn).sum(dim=-1)
    c = 1.0 - off / max(m - 1, 1)
    return c / (c.sum() + EPS)


def _cos_rows(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(EPS) * b.norm(dim=-1).clamp_min(EPS))


def variation_score(x_in: Tensor, x_att: Tensor, x_ffn: Tensor) -> Tensor:
    """s_var (Eqs. 14-17): softmax-normalised cosine change times norm ratio, per branch.

    ``x_in``, ``x_att``, ``x_ffn``: [M, d] residual stream at the layer input, after the
    attention branch and after the FFN branch.
    """
    x_in = check_tokens(x_in, "x_in")
    x_att = check_tokens(x_att, "x_att")
    x_ffn = check_tokens(x_ffn, "x_ffn")
    if not x_in.shape == x_att.shape == x_ffn.shape:
        raise ValueError("x_in, x_att and x_ffn must have the same shape")
    return _variation_score(x_in, x_att, x_ffn)


def _variation_score(x_in: Tensor, x_att: Tensor, x_ffn: Tensor) -> Tensor:
    in_norm = x_in.norm(dim=-1)
    score = torch.zeros(x_in.shape[0], device=x_in.device)
    for x_b in (x_att, x_ffn):
        p = torch.softmax(1.0 - _cos_rows(x_in, x_b), dim=0)
        r = x_b.norm(dim=-1) / (in_norm + EPS)
        score = score + p * r
    return score


def ablation_score(attn: Tensor, values: Tensor, hidden: Tensor) -> Tensor:
    """s_abl (Eqs. 22-23): mean over i != k of a_ik / (1 - a_ik + eps) * |y_i| * |v_k|.

    ``attn``: patch-to-patch softmax attention [H, M, M] (head-averaged here) or [M, M]
    (rows = queries i, columns = keys k; not renormalised after dropping CLS).
    ``values``: [H, M, dv] or [M, dv] (head-averaged here). ``hidden``: [M, d], y_i.
    """
    a = check_finite(attn, "attn")
    v = check_finite(values, "values")
    y = check_tokens(hidden, "hidden")
    a = a.mean(dim=0) if a.dim() == 3 else a
    v = v.mean(dim=0) if v.dim() == 3 else v
    m = y.shape[0]
    if a.shape != (m, m) or v.dim() != 2 or v.shape[0] != m:
        raise ValueError(
            f"attn must be [.., {m}, {m}] and values [.., {m}, dv] for {m} tokens, "
            f"got {tuple(attn.shape)} and {tuple(values.shape)}"
        )
    return _ablation_score(a, v, y)


def _ablation_score(a: Tensor, v: Tensor, y: Tensor) -> Tensor:
    """Eq. 23 on head-averaged ``a`` [M, M] and ``v`` [M, dv]: the sum over queries i is
    one vector-matrix product with |y_i|, not an [M, M] product matrix."""
    m = y.shape[0]
    ratio = (a / (1.0 - a + EPS)).fill_diagonal_(0.0)  # [i, k], i != k
    return (y.norm(dim=-1) @ ratio) * v.norm(dim=-1) / max(m - 1, 1)


def importance_scores(
    tokens: Tensor,
    cls_attn: Tensor | None = None,
    x_in: Tensor | None = None,
    x_att: Tensor | None = None,
    x_ffn: Tensor | None = None,
    attn: Tensor | None = None,
    values: Tensor | None = None,
) -> Tensor:
    """s_i (Eq. 2 / Eq. 9) = s_cls + s_cos + s_var + s_abl over the available terms.

    s_cos is always computed from ``tokens`` (the layer output y); s_cls needs
    ``cls_attn``, s_var needs all of ``x_in, x_att, x_ffn``, s_abl needs ``attn`` and
    ``values``.  A term whose inputs are missing is left out (e.g. no CLS on Qwen).
    """
    y = check_tokens(tokens)
    s = cosine_score(y)
    if cls_attn is not None:
        s = s + cls_score(cls_attn)
    if x_in is not None and x_att is not None and x_ffn is not None:
        s = s + variation_score(x_in, x_att, x_ffn)
    if attn is not None and values is not None:
        s = s + ablation_score(attn, values, y)
    return s


def _importance(y: Tensor, scores: "StageScores") -> Tensor:
    """Eq. 9 on validated float32 inputs (the served path checks the layer once)."""
    s = _cosine_score(y)
    if scores.cls_attn is not None:
        s = s + _cls_score(scores.cls_attn)
    s = s + _variation_score(scores.x_in, scores.x_att, y)
    return s + _ablation_score(scores.attn, scores.values.mean(dim=0), y)


def partition(scores: Tensor, num_anchors: int) -> tuple[Tensor, Tensor]:
    """Anchor and context indices (both ascending): the ``num_anchors`` top scores vs the rest."""
    anchors = stable_topk(scores, num_anchors)
    is_anchor = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    is_anchor[anchors] = True
    return anchors, torch.nonzero(~is_anchor).flatten()


# --- Eqs. 3-4: context-to-anchor graph -------------------------------------------------

def grid_positions(num_tokens: int, width: int | None = None, device=None) -> Tensor:
    """(row, col) grid coordinates [num_tokens, 2] of a row-major patch grid.

    ``width`` defaults to sqrt(num_tokens) (24 for CLIP-L/336's 576 patches).
    """
    if width is None:
        width = math.isqrt(num_tokens)
        if width * width != num_tokens:
            raise ValueError(f"{num_tokens} tokens is not a square grid; pass width")
    idx = torch.arange(num_tokens, device=device)
    return torch.stack([idx // width, idx % width], dim=1).float()


def edge_weights(x_ctx: Tensor, x_anc: Tensor, p_ctx: Tensor, p_anc: Tensor, tau: float = TAU) -> Tensor:
    """e_ij (Eq. 3) = cos(x_i^c, x_j^a) * exp(-|p_i^c - p_j^a|^2 / tau), shape [M_c, M_a]."""
    sq_dist = ((p_ctx.unsqueeze(1) - p_anc.unsqueeze(0)) ** 2).sum(-1)
    return cosine_matrix(x_ctx, x_anc) * torch.exp(-sq_dist / tau)


def graph_update(
    tokens: Tensor,
    anchors: Tensor,
    context: Tensor,
    positions: Tensor,
    k_n: int = K_N,
    tau: float = TAU,
    alpha: float = ALPHA,
) -> Tensor:
    """Updated anchor tokens (Eq. 4): x_j + alpha * sum_{top-k_n i} e_bar_ij x_i^c.

    Each anchor keeps its ``k_n`` context neighbours with the largest e_ij (ties to the
    lowest context index); edges with e_ij <= 0 get weight 0 (see module docstring).
    Returns [M_a, d] in the order of ``anchors``.
    """
    return _graph_update(check_tokens(tokens), anchors, context,
                         check_finite(positions, "positions"), k_n, tau, alpha)


def _graph_update(x: Tensor, anchors: Tensor, context: Tensor, p: Tensor, k_n: int,
                  tau: float, alpha: float) -> Tensor:
    x_anc = x[anchors]
    if context.numel() == 0 or alpha == 0:
        return x_anc
    x_ctx = x[context]
    # e_ij of Eq. 3 with anchors as rows ([Ma, Mc]): each anchor's top-k_n is then a
    # reduction along contiguous memory
    e = edge_weights(x_anc, x_ctx, p[anchors], p[context], tau)
    w = torch.where(top_k_mask(e, min(k_n, e.shape[1])), e.clamp_min(0.0), 0.0)
    total = w.sum(dim=1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(EPS), 0.0)
    return x_anc + alpha * (w @ x_ctx)  # each anchor's weighted top-k_n neighbours


def top_k_mask(e: Tensor, k: int) -> Tensor:
    """Bool [A, M]: the ``k`` largest entries of each row of ``e``, ties at the k-th value
    to the lowest column (what a stable descending sort's first k give), from a partial
    top-k instead of a full sort."""
    kth = torch.topk(e, k, dim=1).values[:, -1:]  # [A, 1]
    above = e > kth
    tied = e == kth
    room = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=1) <= room))


def acgr_stage(
    tokens: Tensor,
    target: int,
    positions: Tensor,
    cls_attn: Tensor | None = None,
    x_in: Tensor | None = None,
    x_att: Tensor | None = None,
    x_ffn: Tensor | None = None,
    attn: Tensor | None = None,
    values: Tensor | None = None,
    k_n: int = K_N,
    tau: float = TAU,
    alpha: float = ALPHA,
) -> tuple[Tensor, Tensor]:
    """One ACGR stage (Sec. 3.2): score (Eq. 9), keep ``target`` anchors, recover (Eq. 4).

    ``tokens``: the layer's patch tokens y [M, d] (no CLS); ``positions``: their grid
    coordinates [M, 2] (carry them along with the kept indices between stages); the
    optional score inputs are those of :func:`importance_scores`.
    Returns ``(kept, new_tokens)``: kept indices into ``tokens`` (int64, ascending) and
    the updated anchors [len(kept), d] in ``tokens``' dtype.
    """
    y, target, anchors, context = _score_and_split(tokens, target, cls_attn, x_in, x_att,
                                                   x_ffn, attn, values)
    updated = graph_update(y, anchors, context, positions, k_n, tau, alpha)
    return anchors.to(tokens.device), updated.to(device=tokens.device, dtype=tokens.dtype)


class StageScores(NamedTuple):
    """One encoder layer's inputs to Eq. 9, validated float32: CLS attention [H, M] (or
    None), the residual stream at the layer input and after its attention [M, d], its
    patch-to-patch attention averaged over heads [M, M] and its values [H, M, dv]."""

    cls_attn: Tensor | None
    x_in: Tensor
    x_att: Tensor
    attn: Tensor
    values: Tensor


def _split(y: Tensor, target: int, scores: StageScores,
           candidates: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Anchors and context of one stage; ``candidates`` [M] bool: the tokens that may be
    anchors before any other (a tile's patches that the image keeps after unpadding)."""
    s = _importance(y, scores)
    if candidates is not None:
        s = s.masked_fill(~candidates, float("-inf"))
    return partition(s, min(target, y.shape[0]))


def _score_and_split(tokens, target, cls_attn, x_in, x_att, x_ffn, attn, values):
    """Eq. 9 scores and the anchor/context split of one stage (fp32 tokens, clipped target)."""
    y = check_tokens(tokens)
    target = min(check_budget(target, "target"), y.shape[0])
    scores = importance_scores(y, cls_attn, x_in, x_att, x_ffn, attn, values)
    anchors, context = partition(scores, target)
    return y, target, anchors, context


# --- Eqs. 5-8: TATCS --------------------------------------------------------------------

def greedy_representative_init(tokens: Tensor, k: int, cls_attn: Tensor | None = None) -> Tensor:
    """Initial centers (Eq. 5), in selection order: repeatedly add the argmax of
    G_i = mean_{j in U} cos(x_i, x_j) - max_{p in S} cos(x_i, x_p) + a_hat_i over i in U.
    """
    x = check_tokens(tokens)
    a_hat = cls_score(cls_attn) if cls_attn is not None else None
    return _greedy_init(x, min(check_budget(k, "k"), x.shape[0]), a_hat)


def _greedy_init(x: Tensor, k: int, a_hat: Tensor | None) -> Tensor:
    """Eq. 5 with the sum over U kept up to date (one cosine row per pick: O(K N d)
    instead of the N x N matrix and an O(N^2) sum per step)."""
    n = x.shape[0]
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)
    sum_u = xn @ xn.sum(dim=0)  # sum over U = every token, the candidate included
    bonus = a_hat if a_hat is not None else torch.zeros(n, device=x.device)
    unselected = torch.ones(n, dtype=torch.bool, device=x.device)
    max_to_selected = torch.zeros(n, device=x.device)
    chosen: list[int] = []
    for step in range(k):
        gain = sum_u / (n - step) - max_to_selected + bonus
        i = int(torch.argmax(gain.masked_fill(~unselected, float("-inf"))))
        chosen.append(i)
        unselected[i] = False
        cos_i = xn @ xn[i]
        sum_u = sum_u - cos_i
        max_to_selected = cos_i if step == 0 else torch.maximum(max_to_selected, cos_i)
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def text_aware_similarity(tokens: Tensor, centers: Tensor, text: Tensor) -> Tensor:
    """sim_ik (Eq. 6) = cos(x_i, z_k) - |cos(x_i, t) - cos(z_k, t)|, shape [N, K]."""
    t = text.reshape(1, -1)
    tx = cosine_matrix(tokens, t)[:, 0]
    tz = cosine_matrix(centers, t)[:, 0]
    return cosine_matrix(tokens, centers) - (tx.unsqueeze(1) - tz.unsqueeze(0)).abs()


def _update_centers(x: Tensor, assign: Tensor, centers: Tensor) -> Tensor:
    """Eq. 8: each center becomes the mean of its tokens; an empty cluster keeps its center."""
    means, counts = segment_mean(x.float(), assign, centers.shape[0])
    return torch.where((counts > 0).unsqueeze(1), means, centers)


def _text_vector(text: Tensor, dim: int) -> Tensor:
    t = check_finite(text, "text")
    if t.dim() == 2:
        t = t.mean(dim=0)
    if t.dim() != 1 or t.shape[0] != dim:
        raise ValueError(f"text must be [{dim}] or [T, {dim}], got shape {tuple(text.shape)}")
    return t


def tatcs_select(
    tokens: Tensor,
    text: Tensor,
    budget: int,
    cls_attn: Tensor | None = None,
    iters: int = TATCS_ITERS,
) -> Tensor:
    """TATCS (Sec. 3.3): indices (int64, ascending) of ``min(budget, N)`` tokens.

    Greedy init (Eq. 5), ``iters`` rounds of text-aware assignment (Eqs. 6-7) and center
    update (Eq. 8), then cluster reselection x_k* = argmax_{i: c_i = k} sim_ik.
    ``text``: [D] or [T, D] (averaged) in the vision tokens' space.
    """
    x = check_tokens(tokens)
    t = _text_vector(text, x.shape[1])
    k = min(check_budget(budget), x.shape[0])
    a_hat = cls_score(cls_attn) if cls_attn is not None else None
    return _tatcs(x, t, k, a_hat, iters).to(tokens.device)


def _tatcs(x: Tensor, t: Tensor, k: int, a_hat: Tensor | None, iters: int) -> Tensor:
    n = x.shape[0]
    if k == n:
        return torch.arange(n, device=x.device)
    centers = x[_greedy_init(x, k, a_hat)]
    for _ in range(iters):
        assign = text_aware_similarity(x, centers, t).argmax(dim=1)
        centers = _update_centers(x, assign, centers)
    sim = text_aware_similarity(x, centers, t)
    assign = sim.argmax(dim=1)
    picked = torch.full((k,), -1, dtype=torch.long, device=x.device)
    for c in range(k):
        members = torch.nonzero(assign == c).flatten()
        if members.numel() > 0:
            picked[c] = members[int(torch.argmax(sim[members, c]))]
    used = torch.zeros(n, dtype=torch.bool, device=x.device)
    used[picked[picked >= 0]] = True
    for c in torch.nonzero(picked < 0).flatten().tolist():
        i = int(torch.argmax(sim[:, c].masked_fill(used, float("-inf"))))
        picked[c] = i
        used[i] = True
    return torch.sort(picked).values


def final_stage(
    tokens: Tensor,
    target: int,
    positions: Tensor,
    text: Tensor | None,
    cls_attn: Tensor | None = None,
    x_in: Tensor | None = None,
    x_att: Tensor | None = None,
    x_ffn: Tensor | None = None,
    attn: Tensor | None = None,
    values: Tensor | None = None,
    delta: float = DELTA,
    k_n: int = K_N,
    tau: float = TAU,
    alpha: float = ALPHA,
    iters: int = TATCS_ITERS,
    text_space_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """Last pruning stage: ACGR, replaced by TATCS when kappa(X_a, X) > delta (Sec. 3.3).

    kappa is measured between the chosen anchors (before recovery) and the stage's
    input tokens.  With TATCS the output is the reselected raw tokens of X.  Without
    ``text`` TATCS is skipped.  ``text_space_tokens`` [M, D] are the same tokens mapped
    into ``text``'s space (LLaVA: through the projector) for TATCS's similarities;
    by default ``tokens`` themselves.  Returns ``(kept, new_tokens, used_tatcs)``.
    """
    y, target, anchors, context = _score_and_split(tokens, target, cls_attn, x_in, x_att,
                                                   x_ffn, attn, values)
    if text is not None and kappa(y[anchors], y) > delta:
        space = y if text_space_tokens is None else text_space_tokens
        kept = tatcs_select(space, text, target, cls_attn, iters).cpu()
        return kept.to(tokens.device), tokens[kept.to(tokens.device)], True
    updated = graph_update(y, anchors, context, positions, k_n, tau, alpha)
    return anchors.to(tokens.device), updated.to(device=tokens.device, dtype=tokens.dtype), False


def schedule(num_tokens: int, budget: int, num_layers: int, every: int = 2) -> list[int]:
    """Per-stage target counts, shrinking uniformly from ``num_tokens`` to the budget.

    One stage after every ``every`` layers (stage s, 1-based, runs after layer
    ``s * every``, 1-based), ``num_layers // every`` stages in all;
    target_s = round(N - (N - K) * s / S) with K = min(budget, N), so the last is K.
    """
    n = check_budget(num_tokens, "num_tokens")
    k = min(check_budget(budget), n)
    stages = num_layers // every if every >= 1 else 0
    if stages < 1:
        raise ValueError(f"num_layers={num_layers} with every={every} gives no pruning stage")
    return [int(round(n - (n - k) * s / stages)) for s in range(1, stages + 1)]


def prune(ctx) -> "PrunedImage":
    """Served entry point inside the tower: an ACGR stage after every second layer,
    shrinking uniformly to the budget (Sec. 3.2), the last one switching to TATCS when
    kappa > delta (Sec. 3.3); TATCS compares projector outputs with the noun embeddings.

    ``ctx.tower`` runs one layer at a time and follows each stage's kept patches
    (``keep``); its ``prefix`` tokens (CLS) are carried through every stage unpruned,
    and its ``grid`` gives the patch positions of Eq. 3.
    ``ctx.candidates`` (a LLaVA-NeXT tile's patches that survive unpadding) rank before
    the rest at every stage, so the budget, at most their count, keeps only them; the
    others still run through the layers and recover into the anchors (Eq. 4).
    A stage's layer is computed once, its attention kept for the scores
    (``layer_probed``); each stage validates the layer output once.
    """
    from vllm_vtprune.pipeline import PrunedImage

    tower, p = ctx.tower, ctx.tower.prefix
    h = tower.embed(ctx.pixel_values)
    targets = schedule(ctx.num_patches, ctx.budget, tower.num_layers, every=2)
    positions = grid_positions(ctx.num_patches, width=tower.grid[1], device=h.device)
    origin = torch.arange(ctx.num_patches, device=h.device)
    candidates = ctx.candidates
    graph = Graph(int(ctx.option("kn")), float(ctx.option("tau")), float(ctx.option("alpha")))
    for i in range(tower.num_layers):
        stage = (i + 1) // 2 - 1
        if (i + 1) % 2 or stage >= len(targets):
            h = tower.layer(i, h)
            continue
        x_att, x_out, probe = tower.layer_probed(i, h)
        y = check_tokens(x_out[0, p:], f"vision tower layer {i} output")
        scores = StageScores(_cls_attention(probe, p), h[0, p:].float(),
                             x_att[0, p:].float(), probe.attn[p:, p:], probe.values[:, p:])
        if stage == len(targets) - 1:
            kept, new = _last_stage(y, targets[stage], positions, scores, graph, ctx.text,
                                    float(ctx.option("delta")),
                                    lambda: ctx.project(x_out[0, p:]).float(), tower.agree,
                                    candidates)
        else:
            kept, new = _stage(y, targets[stage], positions, scores, graph, candidates)
        positions, origin = positions[kept], origin[kept]
        candidates = candidates[kept] if candidates is not None else None
        tower.keep(origin)
        h = torch.cat([x_out[:, :p], new[None].to(h.dtype)], dim=1)
    return PrunedImage.merged(ctx.project(h[0, p:]), origin)


def _cls_attention(probe, prefix: int) -> Tensor | None:
    """Eq. 10's CLS attention to the patches; on a tower without CLS the stand-in its
    family's probe gives (``Probe.received``): the paper evaluates Qwen2-VL (Table 4)
    without naming one, and Eq. 11 normalises either alike."""
    if probe.cls_attn is not None:
        return probe.cls_attn[:, prefix:]
    return probe.received


class Graph(NamedTuple):
    """Eq. 3-4's options: neighbours per anchor, edge temperature, update strength."""

    k_n: int
    tau: float
    alpha: float


def _stage(y: Tensor, target: int, positions: Tensor, scores: StageScores,
           graph: Graph, candidates: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One ACGR stage (Sec. 3.2) on a validated float32 layer output ``y``."""
    anchors, context = _split(y, target, scores, candidates)
    return anchors, _graph_update(y, anchors, context, positions, *graph)


def _last_stage(y: Tensor, target: int, positions: Tensor, scores: StageScores,
                graph: Graph, text: Tensor | None, delta: float,
                text_space: Callable[[], Tensor],
                agree: Callable[[bool], bool] = lambda flag: flag,
                candidates: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`final_stage` on the served path: the projection into the text's space
    (``text_space()``) is computed only when kappa switches to TATCS, a switch every
    tensor-parallel rank takes alike (``agree``: the projection is a collective). With
    ``candidates``, TATCS chooses among them only (``target`` <= their count)."""
    anchors, context = _split(y, target, scores, candidates)
    if agree(text is not None and _kappa(y[anchors], y) > delta):
        space = text_space()
        a_hat = _cls_score(scores.cls_attn) if scores.cls_attn is not None else None
        rows = (torch.arange(y.shape[0], device=y.device) if candidates is None
                else torch.nonzero(candidates).flatten())
        kept = rows[_tatcs(space[rows], _text_vector(text, space.shape[1]),
                           min(target, rows.shape[0]),
                           a_hat[rows] if a_hat is not None else None, TATCS_ITERS)]
        return kept, y[kept]
    return anchors, _graph_update(y, anchors, context, positions, *graph)


def _uses_text(options) -> bool:
    return True  # TATCS compares with the prompt's nouns whenever kappa > delta


METHOD = Method(
    name="dcp",
    where=Where.INSIDE_ENCODER,
    summary="ACGR every 2 encoder layers; TATCS at the last stage when kappa > delta",
    paper='Xue et al., "DCP-Prune: Ultra-Low Token Pruning with Distribution Consistency '
          'Preservation", Secs. 3.2-3.3, Eqs. 1-8 and Appendix A',
    options=(Option("delta", float_ge0, DELTA, "kappa threshold that switches to TATCS"),
             Option("kn", int_ge(1), K_N, "anchor neighbours per context token (Eq. 3)"),
             Option("tau", float_pos, TAU, "edge temperature (Eq. 3)"),
             Option("alpha", float_ge0, ALPHA, "fusion coefficient of the recovery (Eq. 4); "
                    "0 keeps the anchors as the layer gives them")),
    needs=frozenset({"encoder_layers", "cls_attention", "text"}),
    text_conditioned=_uses_text,
    prune=prune,
)
