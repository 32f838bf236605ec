"""ResPrune: greedy residual-energy subspace selection gated by text relevance.

Paper: Li et al., "ResPrune: Text-Conditioned Subspace Reconstruction for Visual Token
Pruning in Large Vision-Language Models", arXiv 2603.21105, Sections III-B to III-F.

Definitions implemented here (equation numbers of the paper):

* Eq. (10)-(11): for the selected set S, the residual of token v_i is
  ``v_i - P_S v_i`` (P_S the orthogonal projector onto span{v_j : j in S}) and its
  residual energy is ``E_i = ||v_i - P_S v_i||^2``.
* Eq. (12): greedy rule ``i* = argmax_{i not in S} E_i`` starting from a seed token.
* Eq. (13): text relevance ``r_i = max_t cos(v_i, t)`` over the (cleaned, noun) text
  tokens ``t`` embedded in the LLM input space.
* Eq. (14)-(15): gated energy ``E~_i = g(r_i) * E_i`` with
  ``g(r) = clamp(r, min=0) ** alpha``.  The extracted paper only says g is
  "monotonically increasing, non-negative, alpha controls the strength"; r^alpha is
  the form given by a third-party summary.  Because r is a cosine and can be negative
  (where r^alpha is undefined for fractional alpha), **r is clamped at 0**: tokens
  anti-aligned with every text token get gate 0, i.e. they are only taken once no
  token with positive gated energy is left (see the fallback below).  ``alpha == 0``
  gives the uniform gate (g == 1 everywhere, also for r <= 0), and no text (``text``
  None or with zero rows: "no nouns found") gives the uniform gate, i.e. the
  task-agnostic variant of Sec. III-E.
* Eq. (16): gated greedy rule ``i* = argmax_{i not in S} E~_i``.

Implementation (Sec. III-E "Efficient residual energy updates", Eq. (17)): greedy
Gram-Schmidt on the tokens is the same computation as **pivoted Cholesky on the Gram
matrix** ``G = V V^T``.  With ``L[k, :] = <q_k, v_:>`` (q_k the k-th Gram-Schmidt basis
vector), selecting pivot p at step k gives

    L[k, :] = (G[p, :] - sum_{r0<=j<k} L[j, p] L[j, :]) / sqrt(E_p)
    E      <- E - L[k, :]**2

(r0: the step at which the current round began, see "Restart" below; r0 = 0 until the
first restart).  Only the K pivot rows of G are ever read, so for K up to N / 4 the torch
path computes ``G[p, :] = V v_p`` when p is picked (K N D multiply-adds in all, against
N^2 D for the whole of G: 9x less at K = 64, N = 576) and every step costs O(N D + k N);
for larger K, one matmul forming G costs less than K memory-bound products
(:data:`FULL_GRAM_SHARE`).  The Triton kernel reads the rows from a precomputed G (one
fast matmul on a GPU).

Restart (when the picks span every remaining token): once every unselected token has
residual energy exactly 0 after the round-off floor below (the budget exceeds the
numerical rank: more tokens than the LLM width, duplicates, images with little
content), Eq. (12)/(16) has nothing left to rank.  A new **round** of the same greedy
expansion then starts on the tokens not yet chosen: the basis is reset (the sum above
runs over the rows of the current round only, ``j >= r0`` with ``r0`` = this step), every
unselected token's residual energy is reset to its initial (floored) energy
``E_i = G[i, i]``, and the pivot is taken by the usual rule on these energies (gated
argmax, then the fallbacks below).  So each round is Eq. (12)/(16) applied to the tokens
not yet chosen, and a second round takes the next most energetic/relevant directions.
This replaces an earlier "lowest unselected index" fill, which ranked tokens by raster
order and let last-bit rounding (which token is still a hair above the floor differs
between CPUs and serving paths) decide the tail.  It happens on real models whenever
the budget exceeds the rank.  If only zero vectors remain, every step restarts and takes
the lowest unselected index.

Conventions (shared bit-for-bit with the Triton kernel in ``vllm_vtprune.kernels``):

* All arithmetic is float32 whatever the input dtype (fp16/bf16 inputs are upcast).
* Ties go to the lowest index.  Because a float32 matmul does not give bit-identical
  results for identical rows at different positions (BLAS blocking), exact duplicates
  differ by a few ulps; every argmax here therefore treats scores
  ``>= max * TIE_SCALE`` (``TIE_SCALE`` = 1 - 1e-5) as tied and takes the lowest index
  among them.
* ``||v_i||^2`` (the diagonal of G: initial energies, floor, default seed) is the row-wise
  sum of squares on both paths, computed once in :func:`prepare_inputs`.
* Round-off floor: the fp32 update ``E_i - L[k,i]^2`` cannot reach exactly 0 for a
  token that lies in the span (duplicates, collinear or zero tokens), it leaves noise of
  order eps * ||v_i||^2.  A residual energy ``E_i <= RTOL * ||v_i||^2`` (``RTOL`` =
  1e-4, i.e. a residual norm below 1 % of the token's own norm) is therefore set to
  exactly 0 ("the token is in the span").  Negative values are likewise 0.  One helper
  applies it, in the greedy loop and to the initial energies of :func:`prepare_inputs`
  (whose outputs the Triton host code hands to the kernel), so it is defined once.
* Pivot with zero energy (a zero-vector seed, or a zero vector picked after a restart):
  its new row is 0 (it adds no direction to the span).
* Fallback when every unselected token has gated energy 0 but some has a positive
  residual (all gates of those tokens 0): take the unselected token with the largest
  *ungated* residual energy.  With the restart rule the result always has
  ``min(budget, N)`` distinct indices and is deterministic.
* Seed: ``seed`` (e.g. the highest-CLS-attention token, passed by the vLLM adapter), or
  when None the largest-norm token (largest ``G[i, i]``, lowest index on ties), as the
  paper does for Qwen2.5-VL (Sec. IV-A1).  The seed is always the first pick (of
  round 1), whatever its gate.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from vllm_vtprune import registry as _registry
from vllm_vtprune.methods._common import check_budget, check_tokens, cosine_matrix

__all__ = [
    "RTOL",
    "TIE_SCALE",
    "argmax_lowest",
    "select",
    "select_order",
    "select_batch",
    "relevance",
    "gate",
    "gram",
    "seed_index",
    "greedy_order",
    "sq_norms",
    "GreedyInputs",
    "prepare_inputs",
]

#: Relative round-off floor on residual energies (see module docstring).
RTOL = 1e-4
#: Scores >= max * TIE_SCALE count as tied with the max (lowest index wins).
TIE_SCALE = 1.0 - 1e-5

TextArg = Union[None, Tensor, Sequence[Optional[Tensor]]]


def gram(v: Tensor) -> Tensor:
    """Gram matrix ``G = V V^T`` in float32 (the inner products of Eq. (10)-(11)), for the
    Triton kernel, which reads its pivot rows from it.  ``v``: float32 [N, D]."""
    return v @ v.T


def sq_norms(v: Tensor) -> Tensor:
    """``||v_i||^2 = G[i, i]`` (float32 [N]): Eq. (11)'s energies before any pick."""
    return (v * v).sum(dim=1)


def relevance(v: Tensor, text: Tensor) -> Tensor:
    """Eq. (13): ``r_i = max_t cos(v_i, t)`` (float32 [N]); a zero vector has cos 0."""
    return cosine_matrix(v, text).max(dim=1).values


def gate(v: Tensor, text: Optional[Tensor], alpha: float) -> Tensor:
    """Eq. (15): ``g(r_i) = clamp(r_i, min=0) ** alpha`` (float32 [N]).

    Uniform (all ones) when ``text`` is None / has no rows or ``alpha == 0``.
    """
    n = v.shape[0]
    if text is None or alpha == 0:
        return torch.ones(n, dtype=torch.float32, device=v.device)
    return relevance(v, text).clamp_min(0.0).pow(float(alpha))


def argmax_lowest(s: Tensor) -> int:
    """Lowest index whose value is ``>= max(s) * TIE_SCALE`` (``max(s) >= 0`` assumed).

    The tie-tolerant argmax of Eq. (12)/(16); the Triton kernel does the same in fp32.
    """
    thr = s.max() * TIE_SCALE
    return int(torch.argmax((s >= thr).to(torch.int8)).item())


def seed_index(diag: Tensor, seed) -> int:
    """The first pick: ``seed`` if given (validated), else the largest ``G[i, i]``."""
    n = diag.shape[0]
    if seed is None:
        return argmax_lowest(diag)
    if isinstance(seed, Tensor):
        if seed.numel() != 1:
            raise ValueError(f"seed must be a single index, got shape {tuple(seed.shape)}")
        seed = seed.item()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer index, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < n:
        raise ValueError(f"seed {seed} out of range for {n} tokens")
    return seed


def _floor_energy(e: Tensor, diag: Tensor) -> Tensor:
    """Round-off floor: ``E_i <= RTOL * G[i, i]`` (negatives too) becomes exactly 0."""
    return torch.where(e <= RTOL * diag, torch.zeros_like(e), e)


def _pick(e: Tensor, gvec: Tensor, sel: Tensor) -> int:
    """Eq. (14)/(16) over the unselected tokens, ties to the lowest index; if every
    gated score is 0, the largest ungated energy (lowest index if those are 0 too)."""
    score = torch.where(sel, -1.0, gvec * e)
    p = argmax_lowest(score)
    if not score[p].item() > 0.0:
        p = argmax_lowest(torch.where(sel, -1.0, e))
    return p


#: Above this many picks per token the pivot rows come from a precomputed G (one
#: compute-bound matmul, N^2 D) instead of one memory-bound ``V v_p`` each (K N D): the
#: two cost the same at about a quarter on CPUs (N = 576, D = 1024: 7 ms for G, 3.5 ms
#: for 64 rows).
FULL_GRAM_SHARE = 0.25


def _gs_row(g_p: Tensor, L: Tensor, e: Tensor, p: int, r0: int, step: int) -> Tensor | None:
    """Row ``L[step]`` of one Gram-Schmidt step (Eq. (17)) with pivot ``p``, from the
    pivot's Gram row ``g_p`` and the rows of the current round (``L[r0:step]``);
    None when the pivot is already in the span (it adds no direction)."""
    d = e[p].item()
    if not d > 0.0:
        return None
    return (g_p - L[r0:step, p] @ L[r0:step]) / math.sqrt(d)


def greedy_order(v: Tensor, diag: Tensor, gvec: Tensor, k: int, seed: int) -> Tensor:
    """Gated greedy selection (Eq. (12), (14), (16)) as pivoted Cholesky on ``V V^T``.

    ``v``: float32 tokens [N, D]; ``diag``: their squared norms; ``gvec``: gate g(r) [N];
    ``k`` <= N picks; ``seed``: the first pick.  Returns int64 [k] indices **in pick
    order**.  Each step costs O(N D + j N) (module docstring).  When the current round's
    picks span every unselected token a new round starts.
    """
    n = v.shape[0]
    g = gram(v) if k > FULL_GRAM_SHARE * n else None
    gram_row = (lambda p: g[p]) if g is not None else (lambda p: v @ v[p])  # noqa: E731
    e0 = _floor_energy(diag, diag)  # Eq. (11) at S = {}
    e = e0
    L = torch.zeros(k, n, dtype=torch.float32, device=v.device)
    sel = torch.zeros(n, dtype=torch.bool, device=v.device)
    order = [seed]
    r0 = 0  # step at which the current round began
    for step in range(k):
        if step:
            if not torch.where(sel, 0.0, e).max().item() > 0.0:
                r0, e = step, e0  # restart: new round on the tokens not yet chosen
            order.append(_pick(e, gvec, sel))
        p = order[-1]
        row = _gs_row(gram_row(p), L, e, p, r0, step)
        if row is not None:
            L[step] = row
            e = _floor_energy(e - row * row, diag)  # Eq. (11) updated for S + {p}
        sel[p] = True
    return torch.tensor(order, dtype=torch.int64, device=v.device)


def _prep(tokens: Tensor, budget: int, text: Optional[Tensor], alpha: float):
    v = check_tokens(tokens, "tokens")
    k = min(check_budget(budget), v.shape[0])
    if alpha is None or not (float(alpha) >= 0.0) or float(alpha) == float("inf"):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    t = None
    if text is not None:
        if not isinstance(text, Tensor):
            raise TypeError(f"text must be a torch.Tensor or None, got {type(text).__name__}")
        if text.dim() == 2 and text.shape[0] == 0:
            t = None  # no nouns found -> task-agnostic, uniform gate
        else:
            t = check_tokens(text, "text").to(v.device)
            if t.shape[1] != v.shape[1]:
                raise ValueError(
                    f"text dim {t.shape[1]} does not match token dim {v.shape[1]}"
                )
    return v, k, t, float(alpha)


class GreedyInputs(NamedTuple):
    """What the greedy loop starts from (see :func:`prepare_inputs`)."""

    tokens: Tensor  #: float32 [N, D] validated tokens V
    gate: Tensor  #: float32 [N] gate g(r) of Eq. (15)
    diag: Tensor  #: float32 [N] ||v_i||^2 = diag(G) (the floor is RTOL * diag)
    e0: Tensor  #: float32 [N] initial residual energies, floored
    seed: int  #: the first pick
    k: int  #: number of picks, min(budget, N)


def prepare_inputs(
    tokens: Tensor,
    budget: int,
    text: Optional[Tensor] = None,
    alpha: float = 0.75,
    seed: Optional[int] = None,
) -> GreedyInputs:
    """Validate and prepare one image's greedy inputs (same arguments as :func:`select`).

    Shared by the torch path and the Triton host code, so both start from identical
    tokens, gate, norms, floor and seed.
    """
    v, k, t, alpha = _prep(tokens, budget, text, alpha)
    diag = sq_norms(v)
    return GreedyInputs(v, gate(v, t, alpha), diag, _floor_energy(diag, diag),
                        seed_index(diag, seed), k)


def select_order(
    tokens: Tensor,
    budget: int,
    text: Optional[Tensor] = None,
    alpha: float = 0.75,
    seed: Optional[int] = None,
) -> Tensor:
    """Like :func:`select` but the indices come in pick order (seed first)."""
    p = prepare_inputs(tokens, budget, text, alpha, seed)
    return greedy_order(p.tokens, p.diag, p.gate, p.k, p.seed)


def select(
    tokens: Tensor,
    budget: int,
    text: Optional[Tensor] = None,
    alpha: float = 0.75,
    seed: Optional[int] = None,
) -> Tensor:
    """ResPrune token selection (Eq. (13)-(16), Algorithm 1), torch path.

    Args:
        tokens: [N, D] visual tokens after the projector (any float dtype; fp32 math).
        budget: number of tokens to keep (>= 1); ``min(budget, N)`` are returned.
        text: [T, D] embedded noun tokens, or None / zero rows for the uniform gate.
        alpha: gate strength of Eq. (15) (0.75 LLaVA, 0.3 Qwen2.5-VL in the paper).
        seed: index of the first token (e.g. highest CLS attention); None = largest norm.

    Returns:
        int64 [min(budget, N)] distinct indices, ascending, on ``tokens.device``.

    Raises:
        ValueError: NaN/Inf in ``tokens``/``text``, bad shapes, budget < 1, seed out
        of range, negative alpha.
    """
    return torch.sort(select_order(tokens, budget, text, alpha, seed)).values


def _split_batch_args(tokens: Tensor, text: TextArg, seeds):
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        raise ValueError("tokens must be a 3-D tensor [B, N, D]")
    b = tokens.shape[0]
    if text is None or (isinstance(text, Tensor) and text.dim() == 2):
        texts = [text] * b  # one shared text for the whole batch (or none)
    elif isinstance(text, Tensor) and text.dim() == 3:
        if text.shape[0] != b:
            raise ValueError(f"text batch {text.shape[0]} != tokens batch {b}")
        texts = list(text)
    else:
        texts = list(text)
        if len(texts) != b:
            raise ValueError(f"{len(texts)} texts for a batch of {b}")
    if seeds is None:
        seed_list = [None] * b
    else:
        if isinstance(seeds, Tensor):
            seeds = seeds.reshape(-1).tolist()
        seed_list = list(seeds)
        if len(seed_list) != b:
            raise ValueError(f"{len(seed_list)} seeds for a batch of {b}")
    return texts, seed_list


def select_batch(
    tokens: Tensor,
    budget: int,
    text: TextArg = None,
    alpha: float = 0.75,
    seeds=None,
) -> Tensor:
    """Batched :func:`select`: ``tokens`` [B, N, D] -> int64 [B, min(budget, N)].

    ``text``: None, one [T, D] tensor shared by all images, a [B, T, D] tensor, or a
    list of B entries each [T_b, D] or None.  ``seeds``: None, or B entries (int or
    None).  Row b equals ``select(tokens[b], budget, text_b, alpha, seeds[b])``.
    """
    texts, seed_list = _split_batch_args(tokens, text, seeds)
    if tokens.shape[0] == 0:
        check_budget(budget)
        return torch.empty(0, 0, dtype=torch.int64, device=tokens.device)
    rows = [
        select(tokens[i], budget, texts[i], alpha, seed_list[i])
        for i in range(tokens.shape[0])
    ]
    return torch.stack(rows)


# ---------------------------------------------------------------- served entry point
def prune(ctx) -> "PrunedImage":
    """ResPrune on projector outputs, seeded by the highest CLS attention (Sec. IV-A1),
    or by the largest norm (``seed=norm``; towers without CLS)."""
    from vllm_vtprune.kernels import resprune_select
    from vllm_vtprune.pipeline import PrunedImage

    tokens = ctx.project(ctx.patches)
    seed = None
    if _seed_rule(ctx.option("seed"), ctx.tower.prefix > 0) == "cls":
        seed = int(torch.argmax(ctx.patch_importance))
    idx = resprune_select(tokens, ctx.budget, text=ctx.text, alpha=float(ctx.option("alpha")),
                          seed=seed)
    return PrunedImage.subset(tokens[idx], idx)


def _seed_rule(option: str | None, has_cls: bool) -> str:
    """``seed`` as given, else CLS attention where the tower has a CLS token (LLaVA),
    the largest norm otherwise (the paper's choice for Qwen2.5-VL, Sec. IV-A1)."""
    return option or ("cls" if has_cls else "norm")


def _uses_text(options) -> bool:
    return float(options["alpha"]) != 0.0  # alpha 0: uniform gate, the prompt is unused


def _needs(options) -> frozenset[str]:
    return frozenset({"text", "cls_attention"} if options["seed"] == "cls" else {"text"})


METHOD = _registry.Method(
    name="resprune",
    where=_registry.Where.PROJECTOR_OUTPUT,
    summary="greedy residual-energy subspace selection gated by the prompt's nouns",
    paper='Li et al., "ResPrune: Text-Conditioned Subspace Reconstruction for Visual Token '
          'Pruning in Large Vision-Language Models", arXiv 2603.21105, Eqs. 10-17',
    options=(_registry.Option("alpha", _registry.float_ge0, 0.75, "gate strength (Eq. 15)"),
             _registry.Option("seed", _registry.choice("cls", "norm"), None,
                              "first pick: cls (highest CLS attention; the default where "
                              "the tower has a CLS token) or norm (largest norm)")),
    needs=_needs,
    text_conditioned=_uses_text,
    prune=prune,
)
