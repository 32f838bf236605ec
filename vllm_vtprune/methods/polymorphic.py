"""Polymorphic: density-peak token merging + rater-guided cross-modal pruning.

Implements "Polymorphic: Plug-and-Play Visual Token Compression for Scalable VLMs"
(anonymous submission under double-blind review; no arXiv id):

* stage 1 (encoder output): :func:`pairwise_distance` (Eqs. 1-2), :func:`local_density`
  (Eq. 3, kNN form), :func:`prominence` (Eq. 5), :func:`density_peak_merge` (Eqs. 6-7)
  and :func:`stage1` (CLS-attention retained tokens + merged tokens, Sec. 3.2 / 4.1);
* stage 2 (LLM prefill): :func:`rater_scores` (Eqs. 9-11), :func:`quantile_prune`
  (Eq. 12) and :func:`stage2_schedule` (token counts at the pruning layers).

Choices where the text is silent or ambiguous:

* ``knn`` defaults to 5 (not given in the paper; the usual DPC-kNN setting); self is
  not a neighbour; the kernel form Eq. 4 and the optimisation view Eq. 8 are not used
  (Eq. 7's plain mean is the closed form of Eq. 8 only with uniform rho);
* delta of the densest token(s) (no denser token exists) is max_j D_ij, as in
  density-peak clustering; equal densities do not count as "denser";
* a center is always assigned to its own cluster (so duplicated centers cannot leave
  an empty cluster); other ties go to the lowest index;
* stage 1 keeps ``round(budget * 5.4 / 6.4)`` tokens by CLS attention and merges the
  rest into the remaining slots: Sec. 4.1 reports a retained-to-merged ratio of about
  5.4 : 1; the budget passed here is the stage-1 output size (the paper uses about 2x
  the final budget, the rest being removed by stage 2);
* Eq. 12's quantile threshold keeps exactly the requested count, ties at the threshold
  going to the lowest index; if no text token scores above the mean (Eq. 10), all text
  tokens are raters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vllm_vtprune.registry import Method, Option, Where, int_ge, layer_list

from ._common import (average_schedule, check_budget, check_finite, check_layers, check_tokens,
                      check_vector, layer_counts, scale_layers,
                      segment_mean, stable_topk)

__all__ = [
    "KNN",
    "RETAINED_FRACTION",
    "squared_distance",
    "pairwise_distance",
    "local_density",
    "prominence",
    "density_peak_centers",
    "density_peak_merge",
    "stage1_split",
    "stage1",
    "rater_scores",
    "quantile_prune",
    "stage2_schedule",
]

KNN = 5
RETAINED_FRACTION = 5.4 / 6.4
STAGE2_LAYERS = (3, 7, 16)
STAGE1_FACTOR = 2


#: Squared distances at most this share of ``|a_i|^2 + |b_j|^2`` are float64 round-off of
#: the matmul form (about C * 1e-16 of it) and are set to exactly 0: equal tokens are at
#: distance 0, as explicit differences give.  Distinct float32 tokens this close differ
#: in a few last bits only.
SQ_DIST_FLOOR = 1e-12


def squared_distance(a: Tensor, b: Tensor | None = None) -> Tensor:
    """|a_i - b_j|^2 [Na, Nb] in float64 as |a_i|^2 + |b_j|^2 - 2 a_i.b_j: one matmul
    (N^2 C multiply-adds in BLAS) where explicit differences cost a pass over an
    [Na, Nb, C] difference; float64 keeps the cancellation far below float32's
    resolution, and :data:`SQ_DIST_FLOOR` makes equal tokens exactly 0."""
    a = a.double()
    b = a if b is None else b.double()
    na, nb = (a * a).sum(dim=1), (b * b).sum(dim=1)
    scale = na.unsqueeze(1) + nb.unsqueeze(0)
    d2 = scale - 2.0 * (a @ b.T)
    return torch.where(d2 <= SQ_DIST_FLOOR * scale, torch.zeros_like(d2), d2)


def pairwise_distance(x: Tensor) -> Tensor:
    """D_ij = |x_i - x_j|_2 / sqrt(C) (Eq. 1), float64 (:func:`squared_distance`)."""
    return squared_distance(x).sqrt() / math.sqrt(x.shape[1])


def local_density(dist: Tensor, knn: int = KNN) -> Tensor:
    """rho_i = exp(-mean of the squared distances to the knn nearest others) (Eq. 3).

    ``knn`` is clipped to N - 1; a single token has density 1.  A partial top-k (the
    knn smallest, ascending as a sort gives them, so the same sum), not a full sort.
    """
    n = dist.shape[0]
    k = min(knn, n - 1)
    if k < 1:
        return torch.ones(n, dtype=dist.dtype, device=dist.device)
    off = dist.clone().fill_diagonal_(float("inf"))
    nearest = torch.topk(off, k, dim=1, largest=False, sorted=True).values
    return torch.exp(-(nearest**2).mean(dim=1))


def prominence(dist: Tensor, rho: Tensor) -> Tensor:
    """S_i = rho_i * delta_i, delta_i = min over denser j of D_ij (Eq. 5).

    The densest token(s) get delta = max_j D_ij.
    """
    denser = rho.unsqueeze(0) > rho.unsqueeze(1)  # [i, j]: rho_j > rho_i
    delta = dist.masked_fill(~denser, float("inf")).min(dim=1).values
    delta = torch.where(denser.any(dim=1), delta, dist.max(dim=1).values)
    return rho * delta


def density_peak_centers(x: Tensor, num_clusters: int, knn: int = KNN) -> Tensor:
    """Indices (ascending) of the ``num_clusters`` largest prominence scores (Eq. 5)."""
    dist = pairwise_distance(x)
    return stable_topk(prominence(dist, local_density(dist, knn)), num_clusters)


def density_peak_merge(x: Tensor, num_clusters: int, knn: int = KNN) -> tuple[Tensor, Tensor]:
    """Density-peak clustering merge (Eqs. 1-7).

    Returns ``(merged, assignment)``: ``merged`` [K, C] (K = min(num_clusters, N)) are
    cluster means (Eq. 7), clusters ordered by their center's index; ``assignment`` [N]
    (int64) gives each token's cluster (Eq. 6).  ``merged`` has ``x``'s dtype.
    """
    xf = check_tokens(x)
    n = xf.shape[0]
    k = min(check_budget(num_clusters, "num_clusters"), n)
    dist = pairwise_distance(xf)
    centers = stable_topk(prominence(dist, local_density(dist, knn)), k)
    assignment = dist[:, centers].argmin(dim=1)
    assignment[centers] = torch.arange(k, device=assignment.device)
    merged, _ = segment_mean(xf, assignment, k)  # no cluster is empty: centers are members
    return merged.to(device=x.device, dtype=x.dtype), assignment.to(x.device)


def stage1_split(budget: int, retained_fraction: float = RETAINED_FRACTION) -> tuple[int, int]:
    """(retained, merged) counts for a stage-1 output of ``budget`` tokens (~5.4 : 1)."""
    budget = check_budget(budget)
    retained = min(budget, max(1, int(round(budget * retained_fraction))))
    return retained, budget - retained


def stage1(
    tokens: Tensor,
    attn_scores: Tensor,
    budget: int,
    knn: int = KNN,
    retained_fraction: float = RETAINED_FRACTION,
) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 1 (Sec. 3.2): CLS-attention retained tokens plus density-peak merged tokens.

    ``tokens``: encoder output [N, C] (patches only); ``attn_scores``: [N] CLS attention
    to each patch (models without CLS: the mean attention each token receives).
    Returns ``(out, retained, assignment)``: ``out`` has exactly ``min(budget, N)`` rows,
    the retained tokens in original order first, then the merged ones; ``retained`` are
    their indices (ascending); ``assignment`` [N] is the merged-cluster id of every
    non-retained token and -1 for retained ones.
    """
    x = check_tokens(tokens)
    n = x.shape[0]
    scores = check_vector(attn_scores, n, "attn_scores")
    budget = min(check_budget(budget), n)
    if budget == n:
        return tokens.clone(), torch.arange(n, device=tokens.device), torch.full((n,), -1, device=tokens.device)
    n_keep, n_merge = stage1_split(budget, retained_fraction)
    retained = stable_topk(scores, n_keep)
    rest = torch.ones(n, dtype=torch.bool, device=x.device)
    rest[retained] = False
    assignment = torch.full((n,), -1, dtype=torch.long, device=x.device)
    out = x[retained]
    if n_merge > 0:
        merged, sub_assign = density_peak_merge(x[rest], n_merge, knn)
        assignment[rest] = sub_assign
        out = torch.cat([out, merged], dim=0)
    return (
        out.to(device=tokens.device, dtype=tokens.dtype),
        retained.to(tokens.device),
        assignment.to(tokens.device),
    )


def rater_scores(vision: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Visual token importance (Eqs. 9-11); returns ``(alpha, raters)``.

    M = softmax_text(V T^T / sqrt(d)) (Eq. 9); s_j = mean_i M_ij; raters are the text
    tokens with s_j above the mean of s (Eq. 10); alpha_i = mean over raters of M_ij
    (Eq. 11).  ``raters`` is a bool mask over the text tokens.
    """
    v = check_tokens(vision, "vision")
    t = check_tokens(text, "text")
    if v.shape[1] != t.shape[1]:
        raise ValueError(f"vision dim {v.shape[1]} != text dim {t.shape[1]}")
    m = torch.softmax(v @ t.T / math.sqrt(v.shape[1]), dim=1)
    s = m.mean(dim=0)
    raters = s > s.mean()
    if not raters.any():
        raters = torch.ones_like(raters)
    return m[:, raters].mean(dim=1), raters


def quantile_prune(scores: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Eq. 12: keep the tokens whose score reaches the keep-quantile; ``(kept, pruned)``.

    Exactly ``min(keep, N)`` tokens are kept (ties at the threshold to the lowest index);
    both index tensors are int64 and ascending.
    """
    s = check_vector(scores)
    kept = stable_topk(s, min(check_budget(keep, "keep"), s.shape[0]))
    mask = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    mask[kept] = False
    return kept.to(scores.device), torch.nonzero(mask).flatten().to(scores.device)


def stage2_schedule(
    num_tokens: int,
    budget: int,
    layers: tuple[int, ...] = STAGE2_LAYERS,
    num_layers: int = 32,
) -> list[int]:
    """Token counts after each stage-2 pruning layer, so the layer-average is ~``budget``.

    Sec. 4.1: pruning at fixed layers "to maintain a consistent average number of
    visual tokens across the network"; the per-layer ratio is not given, see
    :func:`vllm_vtprune.methods._common.average_schedule`.
    """
    return average_schedule(num_tokens, budget, layers, num_layers)


def encoder_budget(spec, num_tokens: int) -> int:
    """Stage 1's output size: about 2x the final budget (Sec. 4.1, "K=2"), at most N."""
    return min(num_tokens, STAGE1_FACTOR * spec.tokens_for(num_tokens))


def stage2_layers(num_layers: int) -> tuple[int, ...]:
    """Layers 3, 7 and 16 of LLaVA-1.5's 32 (Sec. 4.1), scaled to ``num_layers``."""
    return scale_layers(STAGE2_LAYERS, num_layers)


def merge_into_kept(hidden: Tensor, kept: Tensor, pruned: Tensor) -> Tensor:
    """Sec. 3.3 "for pruned tokens, we apply the merging strategy of Section 3.2 again":
    every pruned token joins its nearest kept token (Eqs. 1 and 6, kept tokens as the
    centers) and each kept token becomes its cluster's mean (Eq. 7). Returns the kept
    tokens' new states [len(kept), d]."""
    x = check_tokens(hidden)
    if pruned.numel() == 0:
        return hidden[kept]
    nearest = squared_distance(x[pruned], x[kept])  # argmin of D^2 is argmin of D
    segment = torch.cat([torch.arange(len(kept), device=x.device), nearest.argmin(dim=1)])
    merged, _ = segment_mean(torch.cat([x[kept], x[pruned]]), segment, len(kept))
    return merged.to(hidden.dtype)


def rms_normalized(hidden: Tensor) -> Tensor:
    """The token embeddings Eq. 9 compares: the residual stream scaled to unit RMS per
    token (what the decoder layer's attention reads, before its learned norm weight).
    The raw stream's norms reach the hundreds, which saturates Eq. 9's softmax into
    one-hot rows and leaves alpha with exact ties."""
    h = hidden.float()
    return h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-6)


def stage2_decision(image_spans, counts_for, step: int):
    """Stage 2 at its ``step``-th pruning layer (Sec. 3.3): per image, the rater scores
    (Eqs. 9-11) of its live tokens against the prompt's live text tokens after it (all
    text tokens when none follow), both :func:`rms_normalized`, rank them; the top
    ``counts_for(i)[step]`` stay (Eq. 12) and the rest are merged into them (``i``: the
    image's index among ``image_spans``)."""
    from vllm_vtprune.llm_loop import Verdict

    def decide(view):
        rows, hidden = view.rows, view.hidden
        in_image = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for start, end in image_spans:
            in_image |= (rows >= start) & (rows < end)
        keep = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
        new = hidden.clone()
        for i, (start, end) in enumerate(image_spans):
            cols = torch.nonzero((rows >= start) & (rows < end)).flatten()
            text = torch.nonzero(~in_image & (rows >= end)).flatten()
            if text.numel() == 0:
                text = torch.nonzero(~in_image).flatten()
            target = counts_for(i)[step]
            if cols.numel() <= target or text.numel() == 0:
                continue
            alpha, _ = rater_scores(rms_normalized(hidden[cols]), rms_normalized(hidden[text]))
            kept, pruned = quantile_prune(alpha, target)
            new[cols[kept]] = merge_into_kept(hidden[cols], kept, pruned)
            keep[cols[pruned]] = False
        index = torch.nonzero(keep).flatten()
        return Verdict(index, new[index])

    return decide


def llm_plan(spec, image_spans, num_layers: int, full_tokens: int):
    """Stage 2 of one request (:class:`vllm_vtprune.llm_loop.Plan`): pruning at the
    scaled layers 3, 7, 16 so that each image's visual token count averaged over all
    decoder layers (stage 1's 2x before the first) is the budget of its own patches
    (``full_tokens``: each image's unpruned patch count, or one for all)."""
    from vllm_vtprune.llm_loop import Plan

    given = spec.value("layers")
    layers = (check_layers(tuple(int(x) for x in given.split("-")), num_layers,
                           "polymorphic stage-2") if given else stage2_layers(num_layers))
    sizes = [end - start for start, end in image_spans]
    fulls = per_image(full_tokens, len(sizes))

    def counts_for(i: int) -> list[int]:
        return stage2_schedule(sizes[i], min(spec.tokens_for(fulls[i]), sizes[i]), layers,
                               num_layers)

    schedule = {layer: sum(min(n, counts_for(i)[s]) for i, n in enumerate(sizes))
                for s, layer in enumerate(layers)}
    return Plan({layer: stage2_decision(image_spans, counts_for, s)
                 for s, layer in enumerate(layers)},
                visual_counts=layer_counts(num_layers, sum(sizes), schedule))


def per_image(full_tokens, num_images: int) -> list[int]:
    """Each image's unpruned patch count from one count for all or one per image."""
    if isinstance(full_tokens, int):
        return [full_tokens] * num_images
    fulls = [int(n) for n in full_tokens]
    if len(fulls) != num_images:
        raise ValueError(f"{len(fulls)} image token counts for {num_images} images")
    return fulls


def prune(ctx) -> "PrunedImage":
    """Served entry point of stage 1, at the encoder output: ``ctx.budget`` is stage 1's
    output size (:func:`encoder_budget`). A merged token stands at the lowest patch
    index of its cluster (the position M-RoPE families give it)."""
    from vllm_vtprune.pipeline import PrunedImage

    out, retained, assignment = stage1(ctx.patches, ctx.patch_importance, ctx.budget,
                                       knn=int(ctx.option("knn")))
    origins = torch.cat([retained.cpu(), _cluster_origins(assignment.cpu())])
    return PrunedImage.merged(ctx.project(out.to(ctx.hidden.dtype)), origins)


def _cluster_origins(assignment: Tensor) -> Tensor:
    """Lowest member index of each merged cluster (``assignment`` -1: retained)."""
    members = torch.nonzero(assignment >= 0).flatten()
    count = int(assignment.max().item()) + 1 if members.numel() else 0
    first = torch.full((count,), assignment.shape[0], dtype=torch.int64, device=assignment.device)
    return first.scatter_reduce(0, assignment[members], members, reduce="amin")


METHOD = Method(
    name="polymorphic",
    where=Where.INSIDE_LLM,
    summary="stage 1: density-peak merge to 2x the budget at the encoder output; stage 2: "
            "rater-guided pruning at decoder layers 3, 7, 16 (scaled) to a layer-averaged budget",
    paper='"Polymorphic: Plug-and-Play Visual Token Compression for Scalable VLMs" '
          "(anonymous submission under review; no arXiv id), Secs. 3.2-3.3, Eqs. 1-12",
    options=(Option("knn", int_ge(1), KNN, "neighbours in the local density (Eq. 3)"),
             Option("layers", layer_list, None,
                    "stage-2 pruning layers (default 3-7-16 of 32, scaled by depth)")),
    needs=frozenset({"cls_attention", "llm_attention"}),
    prune=prune,
    encoder_budget=encoder_budget,
    llm_plan=llm_plan,
)
