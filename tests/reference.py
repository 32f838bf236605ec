"""Shared test helpers: slow float64 references written straight from the definitions.

``resprune_reference_order`` / ``resprune_reference_trace`` implement ResPrune (Eq.
(10)-(16) of the paper plus the documented conventions of
``vllm_vtprune.methods.resprune``: clamped gate, relative round-off floor RTOL,
tie window, ungated fallback, restart rule) by projecting every token onto the span of
the current round's picks with ``torch.linalg.lstsq`` at every step.  They share no
code with the package: the constants are restated, not imported, on purpose.

Import as ``from tests.reference import ...`` (``tests`` is a package; pytest is run
as ``python -m pytest`` from the repository root, which puts the root on sys.path).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch

RTOL = 1e-4  # documented round-off floor: E_i <= RTOL * ||v_i||^2 counts as 0
TIE = 1e-5  # documented relative tie window: s >= max * (1 - TIE) is tied


def cosine(a: Sequence[float], b: Sequence[float], eps: float = 1e-8) -> float:
    """Cosine similarity of two plain sequences; 0 if either norm is below ``eps``."""
    na = math.sqrt(sum(v * v for v in a))
    nb = math.sqrt(sum(v * v for v in b))
    if na < eps or nb < eps:
        return 0.0
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


# ----------------------------------------------------------------------------- ResPrune
def _relevance(v: torch.Tensor, text: Optional[torch.Tensor]) -> Optional[list[float]]:
    """Eq. (13) ``r_i = max_t cos(v_i, t)`` in float64 (None: no text)."""
    if text is None or text.shape[0] == 0:
        return None
    t = text.detach().to(torch.float64)
    dots = v @ t.T
    den = v.norm(dim=1, keepdim=True) * t.norm(dim=1).unsqueeze(0)
    cos = torch.where(den > 0, dots / torch.where(den > 0, den, 1.0), 0.0)
    return [float(c) for c in cos.max(dim=1).values]


def _gate(rel: Optional[list[float]], n: int, alpha: float) -> list[float]:
    """Eq. (15) ``clamp(r, 0) ** alpha``; uniform without text or with alpha 0."""
    if rel is None or alpha == 0:
        return [1.0] * n
    return [max(r, 0.0) ** alpha for r in rel]


def _raw_energies(v: torch.Tensor, basis: list[int]) -> list[float]:
    """``||v_i - P v_i||^2`` for every token, P the projector onto span(v[basis])."""
    r = v.T
    if basis:
        a = v[basis].T  # [D, m]
        r = r - a @ torch.linalg.lstsq(a, v.T, driver="gelsd").solution
    return [float(x) for x in (r * r).sum(0)]


def _argmax_lowest(cand: list[int], score) -> int:
    m = max(score[i] for i in cand)
    return min(i for i in cand if score[i] >= m * (1 - TIE))


def _gap(cand: list[int], score, best: int) -> float:
    """Relative gap (s1 - s2) / s1 of a decision; 0 on a tie, inf without a rival."""
    rivals = [score[i] for i in cand if i != best]
    if not rivals:
        return math.inf
    s1, s2 = max(score[i] for i in cand), max(rivals)
    if s2 >= s1 * (1 - TIE) or s1 <= 0:
        return 0.0  # tie (or all zero): decided by the lowest index
    return (s1 - s2) / s1


def _floor_distance(raw: list[float], norms: list[float], cand: list[int]) -> float:
    """min_i |e_raw_i - floor_i| / floor_i: how near a token is to flipping 0 <-> > 0."""
    d = [abs(raw[i] - RTOL * norms[i]) / (RTOL * norms[i]) for i in cand if norms[i] > 0]
    return min(d, default=math.inf)  # zero vectors are exactly 0 on every path


def _stage_gate_distance(rel, cand, e, alpha, gated: bool) -> float:
    """How near the gated/ungated stage decision is to flipping through a gate that sits
    at the clamp r = 0 (cosines have absolute noise, so this distance is |r|)."""
    if rel is None or alpha == 0:
        return math.inf  # uniform gate: no clamp
    live = [rel[i] for i in cand if e[i] > 0]
    if gated:  # all positive-gate candidates turning 0 would switch to the fallback
        return max((r for r in live if r > 0), default=math.inf)
    return min((abs(r) for r in live), default=math.inf)  # one turning positive


def _seed(norms: list[float], seed) -> tuple[int, float]:
    if seed is not None:
        return int(seed), math.inf
    cand = list(range(len(norms)))
    best = _argmax_lowest(cand, norms)
    return best, _gap(cand, norms, best)


def _energies(v, norms, basis, cand):
    """Floored residual energies of ``cand`` w.r.t. ``basis`` and the floor distance."""
    raw = _raw_energies(v, basis)
    e = {i: 0.0 if raw[i] <= RTOL * norms[i] else raw[i] for i in cand}
    return e, _floor_distance(raw, norms, cand)


def _decide(cand, e, g, rel, alpha) -> tuple[int, float]:
    """Eq. (16) with the ungated fallback; returns the pick and its decision margin."""
    score = {i: g[i] * e[i] for i in cand}
    gated = max(score.values()) > 0
    use = score if gated else e
    best = _argmax_lowest(cand, use)
    return best, min(_gap(cand, use, best), _stage_gate_distance(rel, cand, e, alpha, gated))


def resprune_reference_trace(
    tokens: torch.Tensor,
    budget: int,
    text: Optional[torch.Tensor] = None,
    alpha: float = 0.75,
    seed: Optional[int] = None,
) -> tuple[list[int], list[float]]:
    """ResPrune picks in order and, per step, the margin of the decision.

    ``margins[0]``: inf for an explicit seed, else the relative gap of the largest
    norm.  ``margins[step]`` (step >= 1): the relative gap ``(s1 - s2) / s1`` between
    the best and the runner-up score in the stage that decided (gated, or ungated
    fallback; 0 on a tie decided by the lowest index, inf with one candidate), taken
    as min with ``|e_raw - floor| / floor`` of every unselected token's pre-floor
    residual energy (w.r.t. the current round's span, before a restart: a token near
    its floor could flip the restart decision or its zero status between float paths)
    and, with a text gate, with the distance of the stage decision from a gate at
    the clamp r = 0.  Two float32 paths must agree at a step whose margin is well
    above their rounding noise (given the same earlier picks).
    """
    v = tokens.detach().to(torch.float64)
    n = v.shape[0]
    k = min(budget, n)
    norms = [float(x) for x in (v * v).sum(1)]
    rel = _relevance(v, text)
    g = _gate(rel, n, alpha)
    first, m0 = _seed(norms, seed)
    order, margins, r0 = [first], [m0], 0
    while len(order) < k:
        cand = [i for i in range(n) if i not in order]
        e, near = _energies(v, norms, order[r0:], cand)
        if max(e.values()) <= 0:  # restart: the round's picks span every candidate
            r0 = len(order)
            e = {i: norms[i] for i in cand}  # floored initial energies (0 only if v_i = 0)
        best, margin = _decide(cand, e, g, rel, alpha)
        order.append(best)
        margins.append(min(margin, near))
    return order, margins


def resprune_reference_order(tokens, budget, text=None, alpha=0.75, seed=None) -> list[int]:
    """ResPrune picks in order (float64 lstsq reference, restart rule included)."""
    return resprune_reference_trace(tokens, budget, text, alpha, seed)[0]


def assert_resprune_order_up_to_ties(
    tokens: torch.Tensor,
    got: Sequence[int],
    text: Optional[torch.Tensor] = None,
    alpha: float = 0.75,
    seed: Optional[int] = None,
    rel: float = 1e-4,
) -> None:
    """Each pick of ``got`` must be a near-argmax (within ``rel``) of the reference
    score given ``got``'s own earlier picks (rounds and restarts follow ``got``)."""
    v = tokens.detach().to(torch.float64)
    n = v.shape[0]
    got = [int(i) for i in got]
    assert len(set(got)) == len(got), got
    norms = [float(x) for x in (v * v).sum(1)]
    g = _gate(_relevance(v, text), n, alpha)
    if seed is not None:
        assert got[0] == seed, (got[0], seed)
    else:
        assert norms[got[0]] >= max(norms) * (1 - rel), (0, got[0])
    r0 = 0
    for step in range(1, len(got)):
        cand = [i for i in range(n) if i not in got[:step]]
        e, _ = _energies(v, norms, got[r0:step], cand)
        if max(e.values()) <= 0:
            r0 = step
            e = {i: norms[i] for i in cand}
        s = {i: g[i] * e[i] for i in cand}
        use = s if max(s.values()) > 0 else e
        m = max(use.values())
        assert use[got[step]] >= m - rel * m, (step, got[step], use[got[step]], m)


# ---------------------------------------------------------------- in-LLM decisions
# 20x the two paths' measured rounding (hidden states and scores agree to ~1e-6)
DECISION_MARGIN = 2e-5


@contextlib.contextmanager
def decision_margins(method: str):
    """Record how far each decision of the reference run is from flipping: FastV's and
    Polymorphic's relative gap between the last kept and the first dropped score; RCP's
    distance of every logit from its threshold and, where the planned count cuts, the gap
    at the cut."""
    from vllm_vtprune.methods import _common, fastv, polymorphic, rcp

    margins: list[float] = []
    originals = []

    def patch(module, name, wrapper):
        originals.append((module, name, getattr(module, name)))
        setattr(module, name, wrapper(getattr(module, name)))

    def topk_gap(original):
        def wrapped(scores, k, *args, **kwargs):
            ranked = torch.sort(scores.float().flatten(), descending=True).values
            if 0 < k < len(ranked):
                margins.append(float((ranked[k - 1] - ranked[k]) / ranked[k - 1].abs()))
            return original(scores, k, *args, **kwargs)
        return wrapped

    def cut_gap(original):  # RCP: the top min(cap, over threshold) logits, at least one
        def wrapped(logits, cap, *args, **kwargs):
            ranked = torch.sort(logits.float(), descending=True).values
            over = int((ranked > 0).sum())
            k = max(1, min(cap, over))
            if k < len(ranked):
                # the kept set changes if the last kept and first dropped swap, or, where
                # the threshold sets the count, if either crosses it
                gap = float(ranked[k - 1] - ranked[k])
                if 0 < over < cap:
                    gap = min(gap, float(ranked[k - 1].abs()), float(ranked[k].abs()))
                margins.append(gap)
            return original(logits, cap, *args, **kwargs)
        return wrapped

    if method == "fastv":
        patch(fastv, "stable_topk", topk_gap)
    elif method == "polymorphic":
        patch(polymorphic, "stable_topk", topk_gap)
    elif method == "rcp":
        patch(rcp, "served_choice", cut_gap)
    try:
        yield margins
    finally:
        for module, name, value in reversed(originals):
            setattr(module, name, value)
