"""What the multimodal processor decided for each request, handed to the usage middleware.

The processor (in the API server process, on one of vLLM's worker threads) is the only
place that knows how many placeholder tokens each image of a request got, and how many
it would have had unpruned; vLLM carries no custom per-request field from there to the
response. The middleware tags each request it forwards with a key in
``mm_processor_kwargs`` (:data:`REQUEST_KEY`); the processor removes the key before vLLM
hashes the request (so caches are unaffected) and records its per-image counts under it;
the middleware takes them when the response is written (and drops them if it never is).
"""
from __future__ import annotations

import dataclasses
import threading

REQUEST_KEY = "vtprune_request"
_LOCK = threading.Lock()
_DECIDED: dict[str, "Decision"] = {}
_MAX_PENDING = 4096  # bounds memory if a tagged request is never answered


@dataclasses.dataclass(frozen=True)
class Decision:
    method: str  # "none" without pruning
    budget: int | float | None
    tokens_before: tuple[int, ...]  # per image, what the unpruned model would use
    tokens_after: tuple[int, ...]  # per image, placeholder tokens actually given


def record(key: str, decision: Decision) -> None:
    with _LOCK:
        if len(_DECIDED) >= _MAX_PENDING:
            _DECIDED.pop(next(iter(_DECIDED)))
        _DECIDED[key] = decision


def take(key: str) -> Decision | None:
    with _LOCK:
        return _DECIDED.pop(key, None)
