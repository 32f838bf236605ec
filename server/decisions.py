"""What the multimodal processor decided for each request, handed to the usage middleware.

The processor (in the API server process, on one of vLLM's worker threads) is the only
place that knows how many placeholder tokens each image of a request got, and how many
it would have had unpruned; vLLM carries no custom per-request field from there to the
response. The middleware tags each request it forwards with a key in
``mm_processor_kwargs`` (:data:`REQUEST_KEY`); the processor removes the key before vLLM
hashes the request (so caches are unaffected) and records its per-image counts under it;
the middleware takes them when the response starts (and drops them if it never does).
Only keys the middleware is expecting are recorded, so a request that was abandoned
while it was being processed, or a tag sent to another endpoint, leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import threading

REQUEST_KEY = "vtprune_request"
_LOCK = threading.Lock()
_PENDING: dict[str, "Decision | None"] = {}  # expected keys, None until recorded
_MAX_PENDING = 65536  # requests in flight at once; beyond it the oldest tag is dropped


@dataclasses.dataclass(frozen=True)
class Decision:
    method: str  # "none" without pruning
    budget: int | float | None
    tokens_before: tuple[int, ...]  # per image, what the unpruned model would use
    tokens_after: tuple[int, ...]  # per image, placeholder tokens actually given
    spec: str = "none"  # the spec in full (options included)
    #: per image, the patches a budget chooses among (LLaVA-NeXT's: no newlines); empty:
    #: ``tokens_before``
    tokens_prunable: tuple[int, ...] = ()


def expect(key: str) -> None:
    """The middleware forwards a request tagged ``key``."""
    with _LOCK:
        if len(_PENDING) >= _MAX_PENDING:
            _PENDING.pop(next(iter(_PENDING)))
        _PENDING[key] = None


def record(key: str, decision: Decision) -> None:
    """The processor's counts for ``key``; ignored unless the middleware expects it."""
    with _LOCK:
        if key in _PENDING:
            _PENDING[key] = decision


def take(key: str) -> Decision | None:
    """The decision recorded for ``key`` (None if none was), no longer expected."""
    with _LOCK:
        return _PENDING.pop(key, None)
