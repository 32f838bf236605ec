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
  learned linear map over the N_q queries (initialised to their mean);
* query dropout zeroes whole queries before aggregation with inverted-dropout scaling;
* A_i uses log(a_i + eps) and a masked mean over retained tokens (previous cumulative
  mask); tokens already pruned are forced to 0 in the cumulative mask anyway;
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

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vllm_vtprune.registry import Method, Option, Where, layer_list, path

from ._common import EPS, check_finite

__all__ = [
    "NUM_QUERIES",
    "QUERY_DROPOUT",
    "intrinsic_attention",
    "attention_logit",
    "gumbel_sigmoid_mask",
    "inference_mask",
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


def intrinsic_attention(attn: Tensor) -> Tensor:
    """a_i (Sec. III-B): question-to-vision attention averaged over heads and questions.

    ``attn``: [B, H, L_q, N] softmax weights of the frozen LLM (the question-rows,
    vision-columns sub-block); returns [B, N].
    """
    if attn.dim() != 4:
        raise ValueError(f"attn must be [B, H, L_q, N], got shape {tuple(attn.shape)}")
    check_finite(attn, "attn")
    return attn.float().mean(dim=(1, 2))


def attention_logit(a: Tensor, keep: Tensor | None = None) -> Tensor:
    """A_i = log(a_i) - masked mean over retained j of log(a_j) (Eq. 4); [B, N]."""
    log_a = torch.log(a.float() + EPS)
    if keep is None:
        return log_a - log_a.mean(dim=-1, keepdim=True)
    w = keep.float()
    mean = (w * log_a).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1.0)
    return log_a - mean


def gumbel_sigmoid_mask(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """Straight-through Gumbel-sigmoid mask (Eqs. 6-7): hard 0/1 forward, soft backward."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(EPS, 1 - EPS)
    noise = torch.log(u) - torch.log1p(-u)  # logistic noise
    y_soft = torch.sigmoid((logits + noise) / tau)
    hard = (y_soft > 0.5).to(y_soft.dtype)
    return hard - y_soft.detach() + y_soft


def inference_mask(logits: Tensor, tau: float = 1.0) -> Tensor:
    """m = 1[sigmoid(logits / tau) > 0.5] (Eq. 8), as a float 0/1 tensor."""
    return (torch.sigmoid(logits / tau) > 0.5).to(torch.float32)


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
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.query_dropout = query_dropout
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_size) * hidden_size**-0.5)
        self.q_proj = nn.Linear(hidden_size, attn_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, attn_dim, bias=False)
        self.aggregate = nn.Linear(num_queries, 1, bias=False)
        nn.init.constant_(self.aggregate.weight, 1.0 / num_queries)
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

    def cross_attention_score(self, h_v: Tensor, h_q: Tensor, q_mask: Tensor | None) -> Tensor:
        """S_q (Eq. 2): aggregated softmax attention of the pruning queries, [B, N]."""
        q = self.q_proj(self.question_queries(h_q, q_mask))
        k = self.k_proj(h_v)
        probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        if self.training and self.query_dropout > 0:
            keep = torch.ones(probs.shape[:2], device=probs.device, dtype=probs.dtype)
            probs = probs * F.dropout(keep, self.query_dropout, training=True).unsqueeze(-1)
        return self.aggregate(probs.transpose(1, 2)).squeeze(-1)

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
        return a + self.cross_attention_score(h_v, h_q, q_mask) + self.token_score(h_v) + self.bias

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
    current = torch.ones(batch_shape)
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


METHOD = Method(
    name="rcp",
    where=Where.INSIDE_LLM,
    summary="learned cross-attention pruners with cumulative masks plus delayed repair adapters",
    paper='Zhang et al., "RCP: Representation Consistency Pruner for Mitigating Distribution '
          'Shift in Large Vision-Language Models", arXiv 2604.04972',
    options=(Option("ckpt", path, None, "trained pruner and adapter weights"),
             Option("layers", layer_list, "2-14-26", "pruning layers")),
    needs=frozenset({"llm_attention", "checkpoint", "text"}),
    text_conditioned=lambda options: True,
)
