"""ResPrune: greedy residual-energy subspace selection gated by text relevance.

Paper: "ResPrune" (see ``/work/shared/papers/resprune.txt``), Sections III-B to III-F.

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

    L[k, :] = (G[p, :] - sum_{j<k} L[j, p] L[j, :]) / sqrt(E_p)
    E      <- E - L[k, :]**2

so after computing G once (O(N^2 D), one matmul, fp32) every step costs O(k N),
independent of the embedding width D.

Conventions (shared bit-for-bit with the Triton kernel in ``vllm_vtprune.kernels``):

* All arithmetic is float32 whatever the input dtype (fp16/bf16 inputs are upcast).
* Ties go to the lowest index.  Because a float32 matmul does not give bit-identical
  results for identical rows at different positions (BLAS blocking), exact duplicates
  differ by a few ulps; every argmax here therefore treats scores
  ``>= max * TIE_SCALE`` (``TIE_SCALE`` = 1 - 1e-5) as tied and takes the lowest index
  among them.
* Round-off floor: the fp32 update ``E_i - L[k,i]^2`` cannot reach exactly 0 for a
  token that lies in the span (duplicates, collinear or zero tokens), it leaves noise of
  order eps * ||v_i||^2.  A residual energy ``E_i <= RTOL * ||v_i||^2`` (``RTOL`` =
  1e-4, i.e. a residual norm below 1 % of the token's own norm) is therefore set to
  exactly 0 ("the token is in the span").  Negative values are likewise 0.
* Pivot with zero energy: its new row is 0 (it adds no direction to the span).
* Fallback when every unselected token has gated energy 0 (all residuals 0 because the
  tokens are exhausted/collinear/duplicates, or all gates 0): take the unselected token
  with the largest *ungated* residual energy; if those are all 0 too, the lowest
  unselected index.  So the result always has ``min(budget, N)`` distinct indices and is
  deterministic.
* Seed: ``seed`` (e.g. the highest-CLS-attention token, passed by the vLLM adapter), or
  when None the largest-norm token (largest ``G[i, i]``, lowest index on ties), as the
  paper does for Qwen2.5-VL (Sec. IV-A1).  The seed is always the first pick, whatever
  its gate.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

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
    "greedy_order_from_gram",
]

#: Relative round-off floor on residual energies (see module docstring).
RTOL = 1e-4
#: Scores >= max * TIE_SCALE count as tied with the max (lowest index wins).
TIE_SCALE = 1.0 - 1e-5

TextArg = Union[None, Tensor, Sequence[Optional[Tensor]]]


def gram(v: Tensor) -> Tensor:
    """Gram matrix ``G = V V^T`` in float32 (the inner products of Eq. (10)-(11)).

    ``v`` must already be float32 [N, D].  Both the torch path and the Triton kernel
    path use this one function, so they start from identical G.
    """
    return v @ v.T


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


def seed_index(g: Tensor, seed) -> int:
    """The first pick: ``seed`` if given (validated), else the largest ``G[i, i]``."""
    n = g.shape[0]
    if seed is None:
        return argmax_lowest(torch.diagonal(g))
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


def greedy_order_from_gram(g: Tensor, gvec: Tensor, k: int, seed: int) -> Tensor:
    """Gated greedy selection (Eq. (12), (14), (16)) as pivoted Cholesky on ``g``.

    ``g``: float32 Gram matrix [N, N]; ``gvec``: gate g(r) [N]; ``k`` <= N picks;
    ``seed``: the first pick.  Returns int64 [k] indices **in pick order**.
    Each step costs O(j N) (Sec. III-E, Eq. (17)), independent of D.
    """
    n = g.shape[0]
    dev = g.device
    diag = torch.diagonal(g).clone()
    floor = RTOL * diag
    e = diag.clone()
    e = torch.where(e <= floor, torch.zeros_like(e), e)  # Eq. (11) at S = {}
    L = torch.zeros(k, n, dtype=torch.float32, device=dev)
    sel = torch.zeros(n, dtype=torch.bool, device=dev)
    neg = torch.full_like(e, -1.0)
    order = torch.empty(k, dtype=torch.int64, device=dev)
    for step in range(k):
        if step == 0:
            p = seed
        else:
            score = torch.where(sel, neg, gvec * e)  # Eq. (14), selected excluded
            p = argmax_lowest(score)  # Eq. (16), ties -> lowest index
            if not score[p].item() > 0.0:
                # every gated energy is 0: largest ungated residual, else lowest index
                p = argmax_lowest(torch.where(sel, neg, e))
        order[step] = p
        d = e[p]
        if d.item() > 0.0:
            # one Gram-Schmidt step expressed on G: L[step] = <q_step, v_:>
            if step > 0:
                row = g[p] - L[:step, p] @ L[:step]
            else:
                row = g[p].clone()
            row = row / torch.sqrt(d)
            L[step] = row
            e = e - row * row  # Eq. (11) updated for S + {p}
            e = torch.where(e <= floor, torch.zeros_like(e), e)
        sel[p] = True
    return order


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


def select_order(
    tokens: Tensor,
    budget: int,
    text: Optional[Tensor] = None,
    alpha: float = 0.75,
    seed: Optional[int] = None,
) -> Tensor:
    """Like :func:`select` but the indices come in pick order (seed first)."""
    v, k, t, alpha = _prep(tokens, budget, text, alpha)
    g = gram(v)
    gv = gate(v, t, alpha)
    s = seed_index(g, seed)
    return greedy_order_from_gram(g, gv, k, s)


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
