"""RCP: Representation Consistency Pruner (residual cross-attention pruner + DRA).

Implements Zhang et al., "RCP: Representation Consistency Pruner for Mitigating
Distribution Shift in Large Vision-Language Models" (arXiv 2604.04972):

* :class:`ResidualCrossAttentionPruner` -- Eqs. 1-8 (question-conditioned pruning
  queries, learnable aggregation, per-token MLP score, intrinsic-attention baseline,
  Gumbel-sigmoid straight-through mask in training, deterministic threshold at
  inference), with 16 pruning queries and query-wise dropout 0.2 by default;
* :func:`intrinsic_attention`, :func:`attention_logit` -- a_i and A_i of Eq. 4;
* :func:`gumbel_sigmoid_mask`, :func:`inference_mask` -- Eqs. 6-7 and Eq. 8;
* :func:`cumulative_mask` -- M^(l) = M^(l-1) * m^(l);
* :class:`DelayedRepairAdapter` -- Eqs. 9-15, identity at initialisation;
* :func:`repair_loss` -- Eqs. 16-18; :func:`retention_rates`, :func:`sparsity_loss`
  -- Eqs. 19-21.

Choices where the extracted text is ambiguous:

* keys K_v of Eq. 2 are a learned projection of the visual hidden states, and the
  question-conditioned queries Q_p (Eq. 1, in the hidden space) are projected into the
  same ``attn_dim`` space; the softmax runs over the N visual tokens; Aggregate is a
  learned linear map over the N_q queries (initialised to their mean, or to
  zero in the log form below);
* S_q (Eq. 2) taken literally (``query_score="softmax"``) aggregates the queries'
  softmax weights; each query's weights sum to 1 over N tokens, so S_q barely moves a
  choice: on shapes-llava v2 it varied 0.02 across tokens (std) against 0.4 for A and
  3-7 for S_i, and the pruners ranked by S_i, which cannot see the question (the
  visual tokens precede it). ``query_score="log"`` (the default) takes each query's attention into Eq. 4's logit space first
  (log-softmax centred over the retained tokens), its aggregate starting at zero (a
  residual on A + S_i): trained 500 steps, its S_q grew where the choice matters (std
  2.3 at the second pruning layer), and through vLLM (400 held-out questions)
  ``rcp:64`` answers 0.698 hard / 0.880 standard against 0.680 / 0.870 for softmax
  modules trained on the same plan (``bench/results/accuracy-v2-*.json``,
  ``bench/results/rcp-swaps-v2.json``);
* query dropout zeroes whole queries before aggregation with inverted-dropout scaling;
* A_i uses log(a_i + eps) and a masked mean over retained tokens (previous cumulative
  mask); tokens already pruned are forced to 0 in the cumulative mask anyway; a_i
  aggregates the question rows by their mean (``intrinsic_rows="mean"``, the default)
  or takes the last one (``"last"``, the row FastV ranks by),
  the paper saying only "aggregating over ... question-token positions";
* the DRA's conditioning lives in its bottleneck space (``bottleneck``, default 512):
  with the hidden size as conditioning width the projections alone would exceed the
  ~10M parameters per adapter the paper reports for LLaVA-7B;
* Eq. 9 is taken literally: masked-out positions enter the softmax as zero vectors;
* identity at initialisation: W_gamma = W_beta = 0 (so gamma = 1, beta = 0) and the Up
  projection starts at zero, so Delta h = 0 exactly while every weight still gets
  gradient once Up moves; the gate alpha starts at 1;
* repair loss: sqrt(v + eps) keeps the gradient finite at zero variance; the squared
  norms are averaged over feature dimensions ("mean squared error").
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vllm_vtprune.registry import Method, Option, Where, layer_list, path

from ._common import EPS, check_finite, check_layers, layer_counts, scale_layers

__all__ = [
    "NUM_QUERIES",
    "QUERY_DROPOUT",
    "intrinsic_attention",
    "attention_logit",
    "centred_log",
    "gumbel_sigmoid_mask",
    "gumbel_topk_mask",
    "planned_counts",
    "inference_mask",
    "served_choice",
    "cumulative_mask",
    "ResidualCrossAttentionPruner",
    "DelayedRepairAdapter",
    "moments",
    "repair_loss",
    "retention_rates",
    "sparsity_loss",
]

NUM_QUERIES = 16
QUERY_DROPOUT = 0.2
#: share of the live visual tokens each pruning layer after the first keeps, in training
#: (:func:`planned_counts`), in serving (the cap at each pruning layer) and in the
#: thresholds calibrated for serving: Table VI of the paper (64 tokens, pruners at layers
#: 2/14/26 of LLaVA-1.5-7B) retains 16.72 %, 4.59 % and 1.44 %, 0.27 and 0.31 of the layer
#: before. Measured on shapes-llava v2 (FastV's rule at layers 1/7/13, 400 held-out
#: questions): 56/16/5 tokens beat a flat 29 at the same layer average, 0.71 vs 0.68 on
#: the hard split, 0.92 vs 0.85 on the standard one; a heavier last stage, 52/16/13
#: (shares 0.31 and 0.81, a checkpoint's ``later_share`` list), answers 0.71 and 0.93.
#: What a checkpoint was trained with is in its config (:attr:`RcpModules.later_shares`).
LATER_SHARE = 0.29
#: what checkpoints without a ``later_share`` in their config were trained with (a flat
#: plan: every later pruning layer 0.95 of the one before)
LEGACY_LATER_SHARE = 0.95
#: how S_q (Eq. 2) aggregates the queries' attention: the softmax weights themselves (as
#: written; checkpoints without a ``query_score`` in their config were trained so) or in
#: Eq. 4's logit space (log-softmax centred over the retained tokens)
QUERY_SCORES = ("softmax", "log")
QUERY_SCORE = "log"  # fresh pruners' default
LEGACY_QUERY_SCORE = "softmax"  # what checkpoints without the key were trained with
#: which question rows a_i (Eq. 4) aggregates, the paper saying only "over question-token
#: positions": their mean (the default; checkpoints without the key) or the last one (the
#: prompt's last token, whose attention FastV ranks by: on shapes-llava v2 it puts 69-76 %
#: of its top tokens on object patches at layer 1, the mean 22 %, base rate 14 %). Trained
#: through the masks alone, pruners on "last" answered 0.42 of 200 held-out questions where
#: those on the mean answered 0.82 (README, "What 64 allows"); with rcp_train's
#: distillation term "last" starts the pruners at FastV's ranking (softmax(A) is its row)
INTRINSIC_ROWS = ("mean", "last")
INTRINSIC_ROW = "mean"  # fresh pruners' default
LEGACY_INTRINSIC_ROW = "mean"  # what checkpoints without the key were trained with


def intrinsic_attention(attn: Tensor, rows: str = INTRINSIC_ROW) -> Tensor:
    """a_i (Sec. III-B): question-to-vision attention averaged over heads and over the
    question rows (``rows="mean"``) or taken at the last one (``"last"``,
    :data:`INTRINSIC_ROWS`).

    ``attn``: [B, H, L_q, N] softmax weights of the frozen LLM (the question-rows,
    vision-columns sub-block); returns [B, N].
    """
    if attn.dim() != 4:
        raise ValueError(f"attn must be [B, H, L_q, N], got shape {tuple(attn.shape)}")
    check_intrinsic_rows(rows)
    check_finite(attn, "attn")
    return question_attention(attn, rows)


def question_attention(attn: Tensor, rows: str) -> Tensor:
    """:func:`intrinsic_attention` without its checks (the served decision's path: its
    attention comes from the model, and a check would copy it and sync the device)."""
    if rows == "last":
        attn = attn[:, :, -1:]
    return attn.float().mean(dim=(1, 2))


def check_intrinsic_rows(rows: str) -> str:
    if rows not in INTRINSIC_ROWS:
        raise ValueError(f"rcp intrinsic_rows={rows!r}; accepted: {', '.join(INTRINSIC_ROWS)}")
    return rows


def attention_logit(a: Tensor, keep: Tensor | None = None) -> Tensor:
    """A_i = log(a_i) - masked mean over retained j of log(a_j) (Eq. 4); [B, N]."""
    return centred_log(torch.log(a.float() + EPS), None if keep is None else keep.float())


def centred_log(log_x: Tensor, weights: Tensor | None = None) -> Tensor:
    """Eq. 4's move into logit space: ``log_x`` minus its mean over the last dimension,
    weighted by ``weights`` (the cumulative keep mask: the retained tokens' mean)."""
    if weights is None:
        return log_x - log_x.mean(dim=-1, keepdim=True)
    mean = (weights * log_x).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp_min(1.0)
    return log_x - mean


def gumbel_sigmoid_mask(logits: Tensor, tau: float, generator: torch.Generator | None = None,
                        noise: float = 1.0) -> Tensor:
    """Straight-through Gumbel-sigmoid mask (Eqs. 6-7): hard 0/1 forward, soft backward.

    ``noise`` scales Eq. 6's logistic noise (1: the paper). At 0 the forward mask is the
    inference rule (Eq. 8) exactly; the temperature alone never gets there, since it
    divides noise and logits alike and the hard mask thresholds their sum at 0.
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(EPS, 1 - EPS)
    g = torch.log(u) - torch.log1p(-u)  # logistic noise
    y_soft = torch.sigmoid((logits + noise * g) / tau)
    hard = (y_soft > 0.5).to(y_soft.dtype)
    return hard - y_soft.detach() + y_soft


def gumbel_topk_mask(logits: Tensor, live: Tensor, k: int, tau: float,
                     generator: torch.Generator | None = None, noise: float = 1.0) -> Tensor:
    """Straight-through mask keeping exactly ``min(k, live)`` of the ``live`` tokens ([N]
    logits, [N] 0/1 live mask): the top-k of Eq. 6's noisy logits ``logits + noise * g``
    forward, ``sigmoid((logits + noise * g - t) / tau)`` backward, ``t`` halfway between
    the k-th and the (k+1)-th noisy logit among the live tokens.

    Not in the paper (Eqs. 6-7 threshold at 0 and leave the count to the sparsity loss,
    Eqs. 19-21): trained so, the pruners of shapes-llava v2 drifted to keeping most
    tokens within 20 steps at the paper's learning rate (the repair loss outweighs the
    sparsity loss at this model's hidden-state scale), and those of v1 to keeping a
    third of the budget at Eq. 8's threshold. A count fixed at the budget leaves the
    pruners to learn which tokens to keep, the question they answer when served, where
    the budget's ceiling sets the count (:class:`RequestState`).
    """
    n = logits.shape[-1]
    live = live > 0.5
    count = int(live.sum())
    noisy = logits.float()
    if noise:
        u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(EPS, 1 - EPS)
        noisy = noisy + noise * (torch.log(u) - torch.log1p(-u))
    ranked = noisy.masked_fill(~live, float("-inf"))
    if k >= count:
        hard = live.to(noisy.dtype)
        threshold = ranked.masked_fill(~live, float("inf")).min() - 1.0
    else:
        top, index = torch.topk(ranked, k + 1)  # sorted: the first k are the top k
        threshold = (top[k - 1] + top[k]) / 2 if k > 0 else top[0] + 1.0
        hard = torch.zeros(n, dtype=noisy.dtype, device=logits.device)
        hard[index[:k]] = 1.0
    y_soft = torch.sigmoid((noisy - threshold.detach()) / tau) * live
    return hard - y_soft.detach() + y_soft


def planned_counts(num_layers: int, pruning_layers: Sequence[int], num_tokens: int,
                   budget: int, later_share: float | Sequence[float] = LATER_SHARE
                   ) -> dict[int, int]:
    """Visual tokens kept from each pruning layer on, in training (the counts of
    :func:`gumbel_topk_mask`) and at most when served (:class:`RequestState`): each later
    pruning layer ``later_share`` of the one before (Table VI's decay; a sequence gives
    each later layer its own share), the first as many as keep the count averaged over
    all ``num_layers`` layers (Eq. 20's r_bar times N) within ``budget`` (at least 1
    everywhere). A budget so large that the first layer keeps every token raises the
    later shares instead (each the same part of the way to 1), so the average still
    comes near the budget."""
    layers = sorted(pruning_layers)
    shares = later_shares(later_share, len(layers))
    room = budget * num_layers - num_tokens * layers[0]
    span = (layers[1] if len(layers) > 1 else num_layers) - layers[0]
    top = max(1, min(num_tokens, room // span))  # no larger first count can fit
    if top == num_tokens and _fits(num_layers, num_tokens,
                                   _decayed(layers, num_tokens, shares), budget):
        raised = _largest_raise(num_layers, layers, num_tokens, budget, shares)
        return _decayed(layers, num_tokens, _raised(shares, raised))
    for first in range(top, 0, -1):  # rounding makes the fit not monotone: try each
        counts = _decayed(layers, first, shares)
        if _fits(num_layers, num_tokens, counts, budget):
            return counts
    return counts


def later_shares(later_share: float | Sequence[float], num_pruning: int) -> tuple[float, ...]:
    """One share per pruning layer after the first: ``later_share`` repeated, or as
    given (then exactly one per later layer, each in (0, 1])."""
    if isinstance(later_share, (int, float)):
        shares = (float(later_share),) * (num_pruning - 1)
    else:
        shares = tuple(float(x) for x in later_share)
        if len(shares) != num_pruning - 1:
            raise ValueError(f"rcp later_share={list(shares)}: one share per pruning layer "
                             f"after the first ({num_pruning - 1}) accepted, or one number")
    if not all(0.0 < x <= 1.0 for x in shares):
        raise ValueError(f"rcp later_share={later_share}: shares in (0, 1] accepted")
    return shares


def _fits(num_layers: int, num_tokens: int, counts: dict[int, int], budget: int) -> bool:
    return sum(layer_counts(num_layers, num_tokens, counts)) <= budget * num_layers


def _raised(shares: tuple[float, ...], t: float) -> tuple[float, ...]:
    return tuple(x + t * (1.0 - x) for x in shares)


def _largest_raise(num_layers: int, layers: list[int], num_tokens: int, budget: int,
                   shares: tuple[float, ...]) -> float:
    """The largest t in [0, 1] whose shares raised t of the way to 1 (:func:`_raised`)
    still fit when the first layer keeps all ``num_tokens``."""
    def fits(t):
        return _fits(num_layers, num_tokens, _decayed(layers, num_tokens, _raised(shares, t)),
                     budget)

    low, high = 0.0, 1.0
    if fits(high):
        return high
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _decayed(layers: list[int], first: int, shares: tuple[float, ...]) -> dict[int, int]:
    counts = {layers[0]: first}
    for previous, layer, share in zip(layers, layers[1:], shares):
        counts[layer] = max(1, round(share * counts[previous]))
    return counts


def inference_mask(logits: Tensor, tau: float = 1.0) -> Tensor:
    """m = 1[sigmoid(logits / tau) > 0.5] (Eq. 8), as a float 0/1 tensor."""
    return (torch.sigmoid(logits / tau) > 0.5).to(torch.float32)


def served_choice(logits: Tensor, cap: int) -> Tensor:
    """Indices of the tokens a pruning layer keeps when served: those Eq. 8's threshold
    keeps, at most ``cap`` of them, the highest logits first (ties to the lower index);
    when the threshold keeps none, the highest logit, so that an image never vanishes
    from the prompt. (The threshold is monotone in the logit: what it keeps is a prefix
    of the ranking.)"""
    ranked = torch.argsort(logits, descending=True, stable=True)
    return ranked[:max(1, min(cap, int(inference_mask(logits).sum())))]


def cumulative_mask(previous: Tensor | None, current: Tensor) -> Tensor:
    """M^(l) = M^(l-1) * m^(l): a token pruned once never comes back."""
    return current if previous is None else previous * current


class ResidualCrossAttentionPruner(nn.Module):
    """Residual cross-attention pruner (Eqs. 1-8).

    logits = A + S_q + S_i + bias with
    Q_p = Q_p0 + mean_t h_q(t) (Eq. 1), S_q = Aggregate(softmax(Q_p K_v^T / sqrt(d)))
    (Eq. 2), S_i = MLP(proj(h_v)) (Eq. 3) and A from the frozen LLM's attention (Eq. 4).
    """

    def __init__(
        self,
        hidden_size: int,
        num_queries: int = NUM_QUERIES,
        attn_dim: int = 256,
        proj_dim: int = 256,
        query_dropout: float = QUERY_DROPOUT,
        query_score: str = QUERY_SCORE,
        intrinsic_rows: str = INTRINSIC_ROW,
    ) -> None:
        super().__init__()
        if query_score not in QUERY_SCORES:
            raise ValueError(f"rcp query_score={query_score!r}; accepted: {', '.join(QUERY_SCORES)}")
        self.query_score = query_score
        self.intrinsic_rows = check_intrinsic_rows(intrinsic_rows)
        self.num_queries = num_queries
        self.query_dropout = query_dropout
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_size) * hidden_size**-0.5)
        self.q_proj = nn.Linear(hidden_size, attn_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, attn_dim, bias=False)
        self.aggregate = nn.Linear(num_queries, 1, bias=False)
        # the log form starts at zero, a residual on A + S_i (untrained queries' log
        # attention is sharp noise that would otherwise outweigh both)
        nn.init.constant_(self.aggregate.weight, 0.0 if query_score == "log" else 1.0 / num_queries)
        self.proj = nn.Linear(hidden_size, proj_dim)
        self.mlp = nn.Sequential(nn.Linear(proj_dim, proj_dim), nn.GELU(), nn.Linear(proj_dim, 1))
        self.bias = nn.Parameter(torch.zeros(()))

    def question_queries(self, h_q: Tensor, q_mask: Tensor | None) -> Tensor:
        """Q_p (Eq. 1): learned queries plus the mean question state over the real L_q."""
        if q_mask is None:
            summary = h_q.mean(dim=1)
        else:
            w = q_mask.to(h_q.dtype).unsqueeze(-1)
            summary = (w * h_q).sum(1) / w.sum(1).clamp_min(1.0)
        return self.queries.unsqueeze(0) + summary.unsqueeze(1)  # [B, Nq, d]

    def cross_attention_score(self, h_v: Tensor, h_q: Tensor, q_mask: Tensor | None,
                              keep: Tensor | None = None) -> Tensor:
        """S_q (Eq. 2): the pruning queries' attention over the visual tokens, aggregated
        over the queries, [B, N]; with ``keep`` [B, N] bool, over the retained tokens only
        (as at inference, where the pruned ones are gone). ``query_score="log"`` takes each
        query's attention into Eq. 4's logit space first (log-softmax minus its mean over
        the retained tokens; 0 at pruned ones)."""
        q = self.q_proj(self.question_queries(h_q, q_mask))
        k = self.k_proj(h_v)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        if keep is not None:  # (a sample whose tokens are all pruned keeps them all here)
            keep = keep | ~keep.any(dim=-1, keepdim=True)
            scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
        if self.query_score == "log":
            per_query = self._centred_log_attention(scores, keep)
        else:
            per_query = torch.softmax(scores, dim=-1)
        if self.training and self.query_dropout > 0:
            kept = torch.ones(per_query.shape[:2], device=per_query.device, dtype=per_query.dtype)
            per_query = per_query * F.dropout(kept, self.query_dropout, training=True).unsqueeze(-1)
        return self.aggregate(per_query.transpose(1, 2)).squeeze(-1)

    @staticmethod
    def _centred_log_attention(scores: Tensor, keep: Tensor | None) -> Tensor:
        """log softmax(scores) in Eq. 4's logit space (:func:`centred_log` over the
        retained tokens), [B, N_q, N]; 0 where ``keep`` is False."""
        log_p = torch.log_softmax(scores, dim=-1)
        if keep is None:
            return centred_log(log_p)
        pruned = ~keep[:, None, :]
        log_p = log_p.masked_fill(pruned, 0.0)  # -inf there; 0 * -inf would be nan
        return centred_log(log_p, (~pruned).to(log_p.dtype)).masked_fill(pruned, 0.0)

    def token_score(self, h_v: Tensor) -> Tensor:
        """S_i (Eq. 3) = MLP(proj(h_v)), [B, N]."""
        return self.mlp(self.proj(h_v)).squeeze(-1)

    def logits(
        self,
        h_v: Tensor,
        h_q: Tensor,
        attn_weights: Tensor,
        q_mask: Tensor | None = None,
        prev_mask: Tensor | None = None,
    ) -> Tensor:
        """Retention logits (Eq. 5) = A + S_q + S_i + bias, [B, N].

        ``h_v`` [B, N, d] visual hidden states, ``h_q`` [B, L, d] question hidden states
        (``q_mask`` [B, L] marks real tokens), ``attn_weights`` [B, N] the a_i of
        :func:`intrinsic_attention`, ``prev_mask`` [B, N] the cumulative keep mask so far.
        """
        a = attention_logit(attn_weights, prev_mask)
        keep = None if prev_mask is None else prev_mask > 0.5
        return (a + self.cross_attention_score(h_v, h_q, q_mask, keep) + self.token_score(h_v)
                + self.bias)

    def forward(
        self,
        h_v: Tensor,
        h_q: Tensor,
        attn_weights: Tensor,
        q_mask: Tensor | None = None,
        prev_mask: Tensor | None = None,
        tau: float = 1.0,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(logits, m, M)``: logits, this layer's mask (Eqs. 6-8) and the
        cumulative mask M = prev_mask * m.  Training: straight-through Gumbel-sigmoid;
        eval: deterministic threshold.
        """
        for name, t in (("h_v", h_v), ("h_q", h_q), ("attn_weights", attn_weights)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or Inf values")
        logits = self.logits(h_v, h_q, attn_weights, q_mask, prev_mask)
        m = gumbel_sigmoid_mask(logits, tau) if self.training else inference_mask(logits, tau)
        return logits, m, cumulative_mask(prev_mask, m)


class DelayedRepairAdapter(nn.Module):
    """Delayed Repair Adapter (Eqs. 9-15): FiLM-modulated bottleneck on answer tokens.

    e_mask = Proj(softmax(q (m*P)^T) (m*P)) (Eq. 9), e_pruned = Proj(masked mean of the
    pruned hidden states) (Eq. 10), cond = e_mask + e_pruned + QueryProj(x) (Eq. 11),
    gamma = 1 + W_g cond, beta = W_b cond (Eqs. 12-13),
    Delta h = alpha * Up(gamma * GELU(Down(x)) + beta) (Eq. 14), h = x + g * Delta h (Eq. 15).
    """

    def __init__(self, hidden_size: int, bottleneck: int = 512, pos_dim: int | None = None) -> None:
        super().__init__()
        pos_dim = hidden_size if pos_dim is None else pos_dim
        self.mask_query = nn.Parameter(torch.randn(pos_dim) * pos_dim**-0.5)
        self.mask_proj = nn.Linear(pos_dim, bottleneck)
        self.pruned_proj = nn.Linear(hidden_size, bottleneck)
        self.query_proj = nn.Linear(hidden_size, bottleneck)
        self.w_gamma = nn.Linear(bottleneck, bottleneck)
        self.w_beta = nn.Linear(bottleneck, bottleneck)
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.gate = nn.Parameter(torch.ones(()))
        for layer in (self.w_gamma, self.w_beta, self.up):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def mask_embedding(self, keep: Tensor, positions: Tensor) -> Tensor:
        """e_mask (Eq. 9): [B, bottleneck] from keep mask [B, N] and positions [N, p] or [B, N, p]."""
        mp = keep.unsqueeze(-1).to(positions.dtype) * positions  # [B, N, p]
        weights = torch.softmax(mp @ self.mask_query, dim=-1)  # [B, N]
        return self.mask_proj((weights.unsqueeze(-1) * mp).sum(dim=1))

    def pruned_embedding(self, keep: Tensor, h_v: Tensor) -> Tensor:
        """e_pruned (Eq. 10): projection of the mean hidden state of the pruned tokens."""
        dropped = (1.0 - keep.to(h_v.dtype)).unsqueeze(-1)
        mean = (dropped * h_v).sum(1) / dropped.sum(1).clamp_min(EPS)
        return self.pruned_proj(mean)

    def context(self, keep: Tensor, positions: Tensor, h_v: Tensor) -> Tensor:
        """Cached pruning context e_mask + e_pruned, [B, bottleneck] (computed at a pruning layer)."""
        return self.mask_embedding(keep, positions) + self.pruned_embedding(keep, h_v)

    def forward(self, x: Tensor, context: Tensor, answer_mask: Tensor) -> Tensor:
        """h_out = x + g * Delta h (Eqs. 11-15); ``x`` [B, L, d], ``answer_mask`` [B, L]."""
        cond = context.unsqueeze(1) + self.query_proj(x)
        gamma = 1.0 + self.w_gamma(cond)
        beta = self.w_beta(cond)
        delta = self.gate * self.up(gamma * F.gelu(self.down(x)) + beta)
        return x + answer_mask.unsqueeze(-1).to(x.dtype) * delta


def moments(h: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, v) of Eqs. 16-17: per-dimension mean and second central moment over rows."""
    mu = h.mean(dim=0)
    v = ((h * h).mean(dim=0) - mu * mu).clamp_min(0.0)
    return mu, v


def _repair_term(student: Tensor, teacher: Tensor) -> Tensor:
    if student.dim() != 2 or student.shape[1] != teacher.shape[1] or teacher.dim() != 2:
        raise ValueError(
            f"student and teacher must be [T, D] with equal D, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    for name, t in (("student", student), ("teacher", teacher)):
        if t.shape[0] == 0 or not torch.isfinite(t).all():
            raise ValueError(f"{name} hidden states are empty or contain NaN/Inf")
    mu_s, v_s = moments(student.float())
    mu_t, v_t = moments(teacher.float())
    std_gap = torch.sqrt(v_s + EPS) - torch.sqrt(v_t + EPS)
    return ((mu_s - mu_t) ** 2).mean() + (std_gap**2).mean()


def repair_loss(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor]) -> Tensor:
    """L_repair (Eq. 18) = 1/D (|mu_s - mu_t|^2 + |sqrt(v_s) - sqrt(v_t)|^2).

    Arguments are the answer-region hidden states [T, D] of one layer, or equal-length
    sequences of them (one per designated layer; the per-layer losses are averaged).
    Student and teacher may have different T.
    """
    if isinstance(student, Tensor):
        student, teacher = [student], [teacher]
    if len(student) != len(teacher) or not student:
        raise ValueError("student and teacher must list the same (non-zero) number of layers")
    return torch.stack([_repair_term(s, t) for s, t in zip(student, teacher)]).mean()


def retention_rates(masks: dict[int, Tensor], num_layers: int, num_tokens: int) -> Tensor:
    """r_l (Eq. 19) for every decoder layer l in [0, num_layers): [num_layers] or [B, num_layers].

    ``masks`` maps each pruning layer to its cumulative keep mask ([N] or [B, N]); other
    layers inherit the mask of the nearest preceding pruning layer, and layers before
    the first pruning layer keep all tokens (r = 1).
    """
    if any(not 0 <= l < num_layers for l in masks):
        raise ValueError(f"pruning layers {sorted(masks)} outside [0, {num_layers})")
    sample = next(iter(masks.values()), None)
    batch_shape = sample.shape[:-1] if sample is not None else ()
    rates = []
    current = torch.ones(batch_shape, device=sample.device if sample is not None else "cpu")
    for layer in range(num_layers):
        if layer in masks:
            current = masks[layer].float().sum(-1) / num_tokens
        rates.append(current)
    return torch.stack(rates, dim=-1)


def sparsity_loss(masks: dict[int, Tensor], num_layers: int, num_tokens: int, target: float) -> Tensor:
    """L_sparse = |r_bar - r*| (Eqs. 20-21), r_bar the mean of r_l over decoder layers.

    With batched masks the loss is averaged over the batch.
    """
    r_bar = retention_rates(masks, num_layers, num_tokens).mean(dim=-1)
    return (r_bar - target).abs().mean()


# ---------------------------------------------------------------- serving (inference)
#: Pruning layers 2, 14, 26 and repair layers 23, 30 of LLaVA-1.5-7B's 32 (Sec. IV-A).
REFERENCE_PRUNING_LAYERS = (2, 14, 26)
REFERENCE_REPAIR_LAYERS = (23, 30)
CHECKPOINT_FORMAT = "vtprune-rcp/1"


@dataclasses.dataclass
class RcpModules:
    """A checkpoint's plug-in modules: one pruner per pruning layer, one adapter per
    repair layer (applied to the answer rows after that decoder layer)."""

    hidden_size: int
    num_layers: int
    pruners: dict[int, ResidualCrossAttentionPruner]
    adapters: dict[int, DelayedRepairAdapter]
    config: dict

    #: what the modules were trained for and how (written into the checkpoint)
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def pruning_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.pruners))

    @property
    def later_share(self) -> float | list[float]:
        """The plan's decay these modules were trained with (:func:`planned_counts`): one
        share for every later pruning layer, or one each."""
        return self.config.get("later_share", LATER_SHARE)

    @property
    def later_shares(self) -> tuple[float, ...]:
        """The share of each pruning layer after the first (:func:`later_shares`)."""
        return later_shares(self.later_share, len(self.pruners))

    def plan(self, num_tokens: int, budget: int) -> dict[int, int]:
        """Tokens kept from each pruning layer on at ``budget`` (:func:`planned_counts`
        with these modules' layers and decay)."""
        return planned_counts(self.num_layers, self.pruning_layers, num_tokens, budget,
                              self.later_share)

    def parameters(self):
        for table in (self.pruners, self.adapters):
            for module in table.values():
                yield from module.parameters()

    def on(self, device) -> "RcpModules":
        """These modules on ``device`` (one copy per device, made once)."""
        device = torch.device(device)
        if next(self.parameters()).device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            copies[device] = dataclasses.replace(
                self, pruners={l: copy.deepcopy(m).to(device) for l, m in self.pruners.items()},
                adapters={l: copy.deepcopy(m).to(device) for l, m in self.adapters.items()})
        return copies[device]

    def train(self, mode: bool = True) -> "RcpModules":
        for table in (self.pruners, self.adapters):
            for module in table.values():
                module.train(mode)
        return self

    def tensors(self) -> dict[str, Tensor]:
        """Flat tensors: ``pruner.<layer>.<name>``, ``adapter.<layer>.<name>``."""
        out = {}
        for kind, table in (("pruner", self.pruners), ("adapter", self.adapters)):
            for layer, module in table.items():
                for name, t in module.state_dict().items():
                    out[f"{kind}.{layer}.{name}"] = t.detach().contiguous().cpu()
        return out


def repair_layers(num_layers: int) -> tuple[int, ...]:
    """Layers 23 and 30 of 32 scaled to ``num_layers`` (strictly increasing, < depth)."""
    out: list[int] = []
    for layer in REFERENCE_REPAIR_LAYERS:
        out.append(min(num_layers - 1, max(round(layer * num_layers / 32),
                                           out[-1] + 1 if out else 0)))
    return tuple(sorted(set(out)))


def build_modules(hidden_size: int, num_layers: int, pruning: tuple[int, ...] | None = None,
                  repair: tuple[int, ...] | None = None, seed: int = 0, **config) -> RcpModules:
    """Freshly initialised modules (pruners at their init, adapters identity, Sec. III-C):
    what training starts from, and the identity checkpoint, which changes only masks."""
    pruning = check_layers(pruning or scale_layers(REFERENCE_PRUNING_LAYERS, num_layers),
                           num_layers, "rcp pruning")
    repair = repair if repair is not None else repair_layers(num_layers)
    config.setdefault("query_score", QUERY_SCORE)
    config.setdefault("intrinsic_rows", INTRINSIC_ROW)
    pruner_cfg = {k: config[k] for k in ("num_queries", "attn_dim", "proj_dim", "query_score",
                                         "intrinsic_rows") if k in config}
    adapter_cfg = {k: config[k] for k in ("bottleneck",) if k in config}
    config.setdefault("later_share", LATER_SHARE)
    later_shares(config["later_share"], len(pruning))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        pruners = {l: ResidualCrossAttentionPruner(hidden_size, **pruner_cfg).eval()
                   for l in pruning}
        adapters = {l: DelayedRepairAdapter(hidden_size, **adapter_cfg).eval() for l in repair}
    finally:
        torch.random.set_rng_state(generator_state)
    return RcpModules(hidden_size, num_layers, pruners, adapters, dict(config))


def save_checkpoint(modules: RcpModules, path: str) -> None:
    """A safetensors file; its metadata says what the modules fit (format, decoder
    depth and width, module sizes) and where they came from (``info``)."""
    import json

    from safetensors.torch import save_file

    meta = {"format": CHECKPOINT_FORMAT, "hidden_size": str(modules.hidden_size),
            "num_layers": str(modules.num_layers), "config": json.dumps(modules.config),
            "info": json.dumps(modules.info)}
    save_file(modules.tensors(), path, metadata=meta)


def load_checkpoint(path: str) -> RcpModules:
    """Modules from a file written by :func:`save_checkpoint` (or training)."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own kinds for a foreign file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"rcp ckpt={path}: cannot be read ({first}); accepted: a file "
                         "written by `vtprune rcp-init` or RCP training") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"rcp ckpt={path}: not an RCP checkpoint (format "
                         f"{CHECKPOINT_FORMAT!r} expected)")
    layers = {"pruner": set(), "adapter": set()}
    for key in tensors:
        kind, layer, _ = key.split(".", 2)
        layers[kind].add(int(layer))
    config = {"later_share": LEGACY_LATER_SHARE, "query_score": LEGACY_QUERY_SCORE,
              "intrinsic_rows": LEGACY_INTRINSIC_ROW,
              **json.loads(meta["config"])}
    modules = build_modules(int(meta["hidden_size"]), int(meta["num_layers"]),
                            tuple(sorted(layers["pruner"])), tuple(sorted(layers["adapter"])),
                            **config)
    modules.info = json.loads(meta.get("info", "{}"))
    for kind, table in (("pruner", modules.pruners), ("adapter", modules.adapters)):
        for layer, module in table.items():
            prefix = f"{kind}.{layer}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                    if k.startswith(prefix)})
    return modules


_LOADED: dict[tuple, RcpModules] = {}


def modules_for(spec) -> RcpModules:
    """The spec's checkpoint, loaded once per file version."""
    return modules_for_path(spec.value("ckpt"))


def modules_for_path(path: str | None) -> RcpModules:
    import os

    if path is None:
        raise ValueError("rcp needs its trained modules; accepted: rcp:K,ckpt=PATH (a file "
                         "written by RCP training, or `vtprune rcp-init` for identity adapters)")
    try:
        key = (os.path.abspath(path), os.stat(path).st_mtime_ns)
    except OSError:
        raise ValueError(f"rcp ckpt={path}: no such file") from None
    if key not in _LOADED:
        _LOADED[key] = load_checkpoint(path)
    return _LOADED[key]


def check_fits(m: RcpModules, num_layers: int, hidden_size: int, path: str) -> None:
    """Refuse modules made for another decoder."""
    if m.hidden_size != hidden_size or m.num_layers != num_layers:
        raise ValueError(f"rcp ckpt={path}: made for a {m.num_layers}-layer "
                         f"decoder of hidden size {m.hidden_size}; this model has "
                         f"{num_layers} layers of hidden size {hidden_size}")


def check_model(spec, num_layers: int, hidden_size: int) -> None:
    """Refuse a checkpoint that does not fit the served decoder."""
    m = modules_for(spec)
    check_fits(m, num_layers, hidden_size, spec.value("ckpt"))
    given = spec.value("layers")
    if given is not None and tuple(int(x) for x in given.split("-")) != m.pruning_layers:
        raise ValueError(f"rcp layers={given}: the checkpoint's pruners sit at layers "
                         f"{'-'.join(map(str, m.pruning_layers))}")


def token_positions(n: int, dim: int, device="cpu") -> Tensor:
    """P of Eq. 9: sinusoidal encodings [n, dim] of the visual tokens' order."""
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(-math.log(10000.0)
                     * torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    out = torch.zeros(n, dim, device=device)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return out


class RequestState:
    """One request's inference (Sec. III-D): deterministic threshold masks (Eq. 8),
    cumulative over the pruning layers, and the adapters' context from what was pruned.

    The budget is a ceiling on the layer-averaged visual count: a pruning layer keeps at
    most its planned count (:meth:`RcpModules.plan`), the highest logits first; what the threshold
    drops stays dropped, so trained modules may keep fewer. Question tokens are the prompt's
    text tokens after the last image (all text tokens when none follow); a_i is their
    attention to the live visual tokens, averaged over heads and questions (Eq. 4).
    """

    def __init__(self, modules: RcpModules, image_spans, budget: int):
        self.modules = modules
        self.spans = list(image_spans)
        self.total = sum(e - s for s, e in self.spans)
        self.counts = modules.plan(self.total, min(budget, self.total))
        # on the CPU until the first decision says where the decoder runs (_bind)
        self.keep = torch.ones(self.total, dtype=torch.bool, device="cpu")
        self.pruned_sum = torch.zeros(modules.hidden_size, device="cpu")
        self.pruned_count = 0
        self.contexts: dict[int, Tensor] = {}

    def _bind(self, device: torch.device) -> None:
        """Move the request's state and modules to the decoder's ``device``."""
        if self.keep.device != device:
            self.modules = self.modules.on(device)
            self.keep, self.pruned_sum = self.keep.to(device), self.pruned_sum.to(device)

    def _image_index(self, rows: Tensor) -> Tensor:
        """Index of each row among the request's visual tokens, -1 for text rows."""
        index = torch.full((len(rows),), -1, dtype=torch.long, device=rows.device)
        offset = 0
        for start, end in self.spans:
            inside = (rows >= start) & (rows < end)
            index[inside] = rows[inside] - start + offset
            offset += end - start
        return index

    def decide(self, layer: int):
        from vllm_vtprune.llm_loop import Verdict

        def decide(view):
            self._bind(view.hidden.device)
            index = self._image_index(view.rows)
            cols = torch.nonzero(index >= 0).flatten()
            last_end = max(e for _, e in self.spans)
            text = torch.nonzero((index < 0) & (view.rows >= last_end)).flatten()
            if text.numel() == 0:
                text = torch.nonzero(index < 0).flatten()
            keep = torch.ones(len(view.rows), dtype=torch.bool, device=view.rows.device)
            if cols.numel() == 0 or text.numel() == 0:
                return Verdict(torch.arange(len(view.rows), device=view.rows.device))
            h = view.hidden.float()
            pruner = self.modules.pruners[layer]
            a = question_attention(view.probs[:, text][:, :, cols][None],
                                   pruner.intrinsic_rows)[0]
            with torch.no_grad():
                logits = pruner.logits(h[cols][None], h[text][None], a[None])[0]
            chosen = served_choice(logits, self.counts[layer])
            dropped = torch.ones(len(cols), dtype=torch.bool, device=cols.device)
            dropped[chosen] = False
            keep[cols[dropped]] = False
            self.keep[index[cols[dropped]]] = False
            self.pruned_sum += h[cols[dropped]].sum(0)
            self.pruned_count += int(dropped.sum())
            return Verdict(torch.nonzero(keep).flatten())

        return decide

    def adapt(self, layer: int):
        def adapt(x: Tensor) -> Tensor:
            self._bind(x.device)
            adapter = self.modules.adapters[layer]
            if layer not in self.contexts:
                with torch.no_grad():
                    p = adapter.mask_query.shape[0]
                    mean = self.pruned_sum / max(1, self.pruned_count)
                    self.contexts[layer] = (
                        adapter.mask_embedding(self.keep[None],
                                               token_positions(self.total, p, x.device))
                        + adapter.pruned_proj(mean[None]))
            with torch.no_grad():
                out = adapter(x.float()[None], self.contexts[layer],
                              torch.ones(1, x.shape[0], device=x.device))[0]
            return out.to(x.dtype)

        return adapt


def llm_plan(spec, image_spans, num_layers: int, full_tokens: int):
    """One request's :class:`vllm_vtprune.llm_loop.Plan`: the checkpoint's pruners
    before their layers, its adapters after theirs (answer rows only)."""
    from vllm_vtprune.llm_loop import Plan

    modules = modules_for(spec)
    if modules.num_layers != num_layers:
        raise ValueError(f"rcp ckpt={spec.value('ckpt')}: made for {modules.num_layers} "
                         f"decoder layers, this model has {num_layers}")
    # each image's share of its own tokens (LLaVA-NeXT's differ per image)
    budget = sum(spec.tokens_for(e - s) for s, e in image_spans)
    if budget >= sum(e - s for s, e in image_spans):
        return Plan()  # a budget at or above the token count keeps everything, as elsewhere
    state = RequestState(modules, image_spans, budget)
    return Plan({l: state.decide(l) for l in modules.pruning_layers},
                {l: state.adapt(l) for l in modules.adapters},
                layer_counts(num_layers, state.total, state.counts))


METHOD = Method(
    name="rcp",
    where=Where.INSIDE_LLM,
    summary="learned cross-attention pruners with cumulative masks plus delayed repair adapters",
    paper='Zhang et al., "RCP: Representation Consistency Pruner for Mitigating Distribution '
          'Shift in Large Vision-Language Models", arXiv 2604.04972',
    options=(Option("ckpt", path, None, "trained pruner and adapter weights"),
             Option("layers", layer_list, None,
                    "pruning layers (the checkpoint's; given, they must match it)")),
    needs=frozenset({"llm_attention"}),
    llm_plan=llm_plan,
    check_model=check_model,
    check_options=lambda options: modules_for_path(options.get("ckpt")),
)
