"""Pruning figures in every completion's ``usage`` and in ``/metrics``.

The token counts are what the multimodal processor decided for each image of the
request (its placeholder count, and the count the unpruned model would have used),
handed over through :mod:`vllm_vtprune.server.decisions`: :class:`VTPruneUsageMiddleware`
(installed by ``--vtprune``, or with ``--middleware
vllm_vtprune.server.usage.VTPruneUsageMiddleware``) tags each request with images, and
adds ``usage.vtprune`` to JSON responses and to the usage chunk of streamed ones
(``stream_options.include_usage``). A server started without
``--trust-request-mm-kwargs`` cannot be tagged; its figures are then derived from the
spec and the family's patch grid (exact for families with a fixed count per image)::

    "vtprune": {"method": "resprune", "budget": 64, "images": 1,
                "visual_tokens_before": 576, "visual_tokens_after": 64,
                "kv_cache_tokens_saved": 512, "kv_cache_bytes_saved": 524288}

``kv_cache_*`` is what is physically saved: visual tokens the LLM never receives (an
encoder-side method, Polymorphic's stage 1). A method that prunes inside the LLM adds
``inside_llm``, what its plan does there, which frees no KV cache (the slots stay
allocated to the request)::

    "inside_llm": {"visual_tokens_layer_average": 64.0, "token_layers_skipped": 3584,
                   "kv_cache_tokens_freed": 0}

``token_layers_skipped`` counts (token, decoder layer) pairs whose work is not done
(rows taken out of the batch; the plan's schedule, which RCP's learned threshold may
undercut); ``visual_tokens_layer_average`` is the visual token count averaged over the
decoder's layers (the budget Polymorphic and RCP aim at).
"""
from __future__ import annotations

import dataclasses
import json
import uuid

from prometheus_client import Counter

from vllm_vtprune import families
from vllm_vtprune import spec as spec_mod
from vllm_vtprune.server import decisions, stats

PATHS = ("/v1/chat/completions", "/v1/completions")
IMAGE_PART_TYPES = ("image_url", "input_image", "image_pil", "image")

REQUESTS = Counter("vtprune_requests", "Requests answered with pruning figures", ["method"])
TOKENS_BEFORE = Counter("vtprune_visual_tokens_before", "Visual tokens before pruning", ["method"])
TOKENS_AFTER = Counter("vtprune_visual_tokens_after", "Visual tokens fed to the LLM", ["method"])
KV_TOKENS_SAVED = Counter("vtprune_kv_cache_tokens_saved", "KV-cache tokens saved", ["method"])
KV_BYTES_SAVED = Counter("vtprune_kv_cache_bytes_saved", "KV-cache bytes saved", ["method"])
stats.register_collector()  # the engine's encode and pruning seconds
TOKEN_LAYERS_SKIPPED = Counter("vtprune_llm_token_layers_skipped",
                               "(visual token, decoder layer) pairs pruned inside the LLM "
                               "(compute skipped, KV cache not freed)", ["method"])


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What one visual token costs the served model."""

    tokens_per_image: int | None  # None: it depends on the image (LLaVA-NeXT, Qwen2-VL)
    kv_bytes_per_token: float  # all layers, keys and values
    num_layers: int = 0  # decoder layers

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "ModelShape":
        mc = vllm_config.model_config
        # None: the count depends on the image, and only the processor's decisions have it
        per_image = families.fixed_image_tokens(families.for_config(mc.hf_config),
                                                mc.hf_config)
        # Whole-model figures: every layer and every KV head, whatever the parallelism.
        layers = mc.hf_text_config.num_hidden_layers
        kv_heads = mc.get_total_num_kv_heads()
        return cls(per_image, 2 * layers * kv_heads * mc.get_head_size()
                   * _kv_dtype_bytes(vllm_config), layers)


def _kv_dtype_bytes(vllm_config) -> float:
    """Bytes per KV element; quantised caches' scales are not counted."""
    cache_dtype = str(vllm_config.cache_config.cache_dtype or "auto")
    if cache_dtype == "auto":
        return vllm_config.model_config.dtype.itemsize
    for prefix, size in (("fp8", 1), ("int8", 1), ("int4", 0.5), ("nvfp4", 0.5),
                         ("fp4", 0.5), ("bfloat16", 2), ("half", 2), ("float16", 2),
                         ("float32", 4), ("float", 4)):
        if cache_dtype.startswith(prefix):
            return size
    raise ValueError(f"vtprune: unknown KV-cache dtype {cache_dtype!r} for byte accounting")


def figures(spec: spec_mod.PruneSpec | None, num_images: int, shape: ModelShape) -> dict:
    """The ``usage.vtprune`` object derived from the spec (untagged requests); without
    counts where an image's count depends on its size."""
    from vllm_vtprune import pipeline

    if shape.tokens_per_image is None:
        return {"method": spec.method if spec is not None else "none",
                "budget": spec.budget if spec is not None else None, "images": num_images}
    kept = pipeline.kept_tokens(spec, shape.tokens_per_image)
    fig = _figures(spec.method if spec is not None else "none",
                   spec.budget if spec is not None else None, num_images,
                   num_images * shape.tokens_per_image, num_images * kept, shape)
    return _with_inside_llm(fig, spec, [kept] * num_images, shape,
                            [shape.tokens_per_image] * num_images)


def decided_figures(decision: decisions.Decision, shape: ModelShape) -> dict:
    """The ``usage.vtprune`` object from what the processor decided for each image."""
    fig = _figures(decision.method, decision.budget, len(decision.tokens_after),
                   sum(decision.tokens_before), sum(decision.tokens_after), shape)
    spec = spec_mod.parse(decision.spec) if decision.spec != "none" else None
    return _with_inside_llm(fig, spec, list(decision.tokens_after), shape,
                            list(decision.tokens_prunable or decision.tokens_before))


def _with_inside_llm(fig: dict, spec, received: list[int], shape: ModelShape,
                     patches: list[int]) -> dict:
    """Add what a method inside the LLM does there (its plan's schedule); ``patches``:
    each image's unpruned patch count."""
    from vllm_vtprune import pipeline, registry

    if not pipeline.acts_in_llm(spec) or not received or not shape.num_layers:
        return fig
    spans, at = [], 0
    for n in received:
        spans.append((at, at + n))
        at += n
    plan = registry.get(spec.method).llm_plan(spec, spans, shape.num_layers, patches)
    counts = plan.visual_counts or [at] * shape.num_layers
    fig["inside_llm"] = {
        "visual_tokens_layer_average": round(sum(counts) / len(counts), 2),
        "token_layers_skipped": at * len(counts) - sum(counts),
        "kv_cache_tokens_freed": 0,
    }
    return fig


def _figures(method, budget, images: int, before: int, after: int, shape: ModelShape) -> dict:
    return {
        "method": method,
        "budget": budget,
        "images": images,
        "visual_tokens_before": before,
        "visual_tokens_after": after,
        "kv_cache_tokens_saved": before - after,
        "kv_cache_bytes_saved": int((before - after) * shape.kv_bytes_per_token),
    }


def count_images(body: dict) -> int:
    n = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            n += sum(1 for part in content
                     if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES)
    return n


def request_spec(body: dict, server_spec: spec_mod.PruneSpec | None):
    kwargs = body.get("mm_processor_kwargs") or {}
    if isinstance(kwargs, dict) and "vtprune" in kwargs:
        return spec_mod.parse(kwargs["vtprune"])
    return server_spec


def record(fig: dict) -> None:
    m = fig["method"]
    REQUESTS.labels(m).inc()
    TOKENS_BEFORE.labels(m).inc(fig["visual_tokens_before"])
    TOKENS_AFTER.labels(m).inc(fig["visual_tokens_after"])
    KV_TOKENS_SAVED.labels(m).inc(fig["kv_cache_tokens_saved"])
    KV_BYTES_SAVED.labels(m).inc(fig["kv_cache_bytes_saved"])
    if "inside_llm" in fig:
        TOKEN_LAYERS_SKIPPED.labels(m).inc(fig["inside_llm"]["token_layers_skipped"])


def inject_usage(payload, fig: dict) -> bool:
    """Add the figures to ``payload["usage"]``; False when there is none to add to
    (vLLM answers a request whose client went away with a JSON ``null`` body)."""
    if not isinstance(payload, dict):
        return False
    usage = payload.get("usage")
    if isinstance(usage, dict):
        usage["vtprune"] = fig
        return True
    return False


class _SSERewriter:
    """Adds the figures to the ``data:`` event that carries usage (split-safe)."""

    def __init__(self, fig):
        self._fig = fig  # called once, when the usage event is written
        self.fig = None
        self.buffer = b""
        self.injected = False

    def feed(self, chunk: bytes, final: bool) -> bytes:
        self.buffer += chunk
        *events, self.buffer = self.buffer.split(b"\n\n")
        if final and self.buffer:
            events.append(self.buffer)
            self.buffer = b""
        out = [self._rewrite(e) for e in events]
        return b"".join(e + b"\n\n" for e in out)

    def _rewrite(self, event: bytes) -> bytes:
        if not event.startswith(b"data: {"):
            return event
        payload = json.loads(event[len(b"data: "):])
        if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
            self.fig = self._fig()
            inject_usage(payload, self.fig)
            self.injected = True
            return b"data: " + json.dumps(payload).encode()
        return event


class VTPruneUsageMiddleware:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app):
        self.app = app
        self._shape: ModelShape | None = None
        self._server_spec: spec_mod.PruneSpec | None = None

    def _model(self, scope) -> tuple[ModelShape, spec_mod.PruneSpec | None]:
        if self._shape is None:
            vllm_config = scope["app"].state.vllm_config
            self._server_spec = spec_mod.parse(
                getattr(vllm_config.model_config.hf_config, "vtprune", None))
            self._shape = ModelShape.from_vllm_config(vllm_config)
        return self._shape, self._server_spec

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope["path"] not in PATHS:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        try:
            request = json.loads(body or b"{}")
            shape, server_spec = self._model(scope)
            spec = request_spec(request, server_spec)
            fallback = figures(spec, count_images(request), shape)
        except (ValueError, AttributeError, TypeError):
            # Malformed requests are vLLM's to reject (HTTP 400); add nothing.
            return await self.app(scope, _replay(body, receive), send)
        key = _tag(request, scope) if fallback["images"] else None
        if key is not None:
            body = json.dumps(request).encode()
            scope = _with_content_length(scope, len(body))

        taken: list[dict] = []

        def fig() -> dict:  # once per request: every usage chunk carries the same figures
            if not taken:
                decision = decisions.take(key) if key is not None else None
                taken.append(decided_figures(decision, shape) if decision is not None
                             else fallback)
            return taken[0]

        try:
            await self.app(scope, _replay(body, receive), _ResponseRewriter(send, fig))
        finally:
            if key is not None:
                decisions.take(key)  # a request that failed or was abandoned


def _tag(request: dict, scope) -> str | None:
    """Tag a request so the processor records its decisions under the returned key;
    None where vLLM would refuse per-request mm_processor_kwargs."""
    renderer = getattr(scope["app"].state, "online_renderer", None)
    kwargs = request.get("mm_processor_kwargs") or {}
    if not getattr(renderer, "trust_request_mm_kwargs", False) or not isinstance(kwargs, dict):
        return None
    key = uuid.uuid4().hex
    request["mm_processor_kwargs"] = {**kwargs, decisions.REQUEST_KEY: key}
    decisions.expect(key)
    return key


def _with_content_length(scope, length: int):
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    return {**scope, "headers": headers + [(b"content-length", str(length).encode())]}


async def _read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """``receive`` that gives ``body`` first, then whatever the client sends next."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _ResponseRewriter:
    """Wraps ``send``: buffers JSON bodies, rewrites SSE streams, counts successes."""

    def __init__(self, send, fig):
        self.send = send
        self._fig = fig  # called once, when the usage is written
        self.start: dict | None = None
        self.kind = "other"
        self.json_chunks: list[bytes] = []
        self.sse: _SSERewriter | None = None

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            return await self._on_start(message)
        if message["type"] != "http.response.body" or self.kind == "other":
            return await self.send(message)
        final = not message.get("more_body", False)
        if self.kind == "sse":
            data = self.sse.feed(message.get("body", b""), final)
            if final and self.sse.injected:
                record(self.sse.fig)
            return await self.send({**message, "body": data})
        self.json_chunks.append(message.get("body", b""))
        if final:
            await self._send_json()

    async def _on_start(self, message):
        headers = dict((k.lower(), v) for k, v in message.get("headers", []))
        ctype = headers.get(b"content-type", b"")
        if message["status"] == 200 and ctype.startswith(b"application/json"):
            self.kind, self.start = "json", message
            self._fig()  # processing is over: take the decision now, not at the end
            return None
        if message["status"] == 200 and ctype.startswith(b"text/event-stream"):
            self._fig()
            self.kind, self.sse = "sse", _SSERewriter(self._fig)
        return await self.send(message)

    async def _send_json(self):
        body = b"".join(self.json_chunks)
        try:
            payload = json.loads(body)
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                fig = self._fig()
                inject_usage(payload, fig)
                record(fig)
                body = json.dumps(payload).encode()
        except ValueError:
            pass
        headers = [(k, v) for k, v in self.start.get("headers", [])
                   if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})
