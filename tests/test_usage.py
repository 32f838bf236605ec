"""Pruning figures (``usage.vtprune``) and the ASGI middleware, without vLLM.

Expected numbers are computed here by hand from the model shape; the middleware is
driven with a tiny hand-written ASGI app standing in for vLLM's endpoint.
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY

from vllm_vtprune import spec as spec_mod
from vllm_vtprune.server import decisions, usage
from vllm_vtprune.server.usage import VTPruneUsageMiddleware

# A LLaVA-1.5-7B-like shape: 336 px / 14 px patches, 32 layers, 32 KV heads of 128, bf16.
IMAGE, PATCH = 336, 14
LAYERS, KV_HEADS, HEAD_DIM = 32, 32, 128
TOKENS = (IMAGE // PATCH) ** 2  # 576
KV_BYTES = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2  # keys + values, all layers, bf16


def _shape(tokens=TOKENS, kv=KV_BYTES):
    return usage.ModelShape(tokens_per_image=tokens, kv_bytes_per_token=kv)


# ---------------------------------------------------------------- figures()


def test_figures_no_spec_saves_nothing():
    fig = usage.figures(None, 2, _shape())
    assert fig == {
        "method": "none", "budget": None, "images": 2,
        "visual_tokens_before": 1152, "visual_tokens_after": 1152,
        "kv_cache_tokens_saved": 0, "kv_cache_bytes_saved": 0,
    }


def test_figures_token_budget_one_image():
    fig = usage.figures(spec_mod.parse("resprune:64"), 1, _shape())
    saved = 576 - 64
    assert fig == {
        "method": "resprune", "budget": 64, "images": 1,
        "visual_tokens_before": 576, "visual_tokens_after": 64,
        "kv_cache_tokens_saved": saved, "kv_cache_bytes_saved": saved * KV_BYTES,
    }
    # 2 * 32 layers * 32 heads * 128 dims * 2 bytes = 524288 bytes per token.
    assert KV_BYTES == 524288


def test_figures_budget_at_or_above_tokens_saves_zero():
    for budget in (576, 1000):
        fig = usage.figures(spec_mod.parse(f"divprune:{budget}"), 3, _shape())
        assert fig["visual_tokens_before"] == 3 * 576
        assert fig["visual_tokens_after"] == 3 * 576
        assert fig["kv_cache_tokens_saved"] == 0
        assert fig["kv_cache_bytes_saved"] == 0
        assert fig["budget"] == budget


@pytest.mark.parametrize("ratio, kept", [
    ("0.25", 144),   # 576 / 4
    ("0.3", 173),    # 172.8 rounds up
    ("1.0", 576),
    ("0.001", 1),    # never fewer than one token
])
def test_figures_ratio_budgets(ratio, kept):
    fig = usage.figures(spec_mod.parse(f"visionzip:{ratio}"), 2, _shape())
    assert fig["method"] == "visionzip"
    assert fig["budget"] == float(ratio)
    assert fig["visual_tokens_before"] == 1152
    assert fig["visual_tokens_after"] == 2 * kept
    assert fig["kv_cache_tokens_saved"] == 1152 - 2 * kept
    assert fig["kv_cache_bytes_saved"] == (1152 - 2 * kept) * KV_BYTES


def test_figures_multiple_images_and_other_shape():
    # 24x24 patches -> 4 images of 100 tokens with a tiny GQA model (2*4*2*64*2 bytes).
    kv = 2 * 4 * 2 * 64 * 2
    fig = usage.figures(spec_mod.parse("resprune:30,alpha=0.5"), 4, _shape(100, kv))
    assert fig["visual_tokens_before"] == 400
    assert fig["visual_tokens_after"] == 120
    assert fig["kv_cache_tokens_saved"] == 280
    assert fig["kv_cache_bytes_saved"] == 280 * 2048
    assert fig["images"] == 4


def test_figures_zero_images():
    fig = usage.figures(spec_mod.parse("resprune:64"), 0, _shape())
    assert fig["visual_tokens_before"] == fig["visual_tokens_after"] == 0
    assert fig["kv_cache_bytes_saved"] == 0


# ---------------------------------------------------------------- vLLM config stubs


class _ModelConfig:
    def __init__(self, dtype=torch.bfloat16, vtprune=None, image=IMAGE, patch=PATCH,
                 layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM):
        vision = SimpleNamespace(image_size=image, patch_size=patch,
                                 model_type="clip_vision_model")
        self.hf_config = SimpleNamespace(vision_config=vision, model_type="llava",
                                         vision_feature_select_strategy="default")
        self.hf_text_config = SimpleNamespace(num_hidden_layers=layers)
        if vtprune is not None:
            self.hf_config.vtprune = vtprune
        self.dtype = dtype
        self._kv_heads, self._head_dim = kv_heads, head_dim

    def get_total_num_kv_heads(self):
        # Whole-model count: the figures must not shrink with tensor parallelism.
        return self._kv_heads

    def get_head_size(self):
        return self._head_dim


_PARALLEL = SimpleNamespace(tensor_parallel_size=1)


def _vllm_config(cache_dtype="auto", **kw):
    return SimpleNamespace(model_config=_ModelConfig(**kw),
                           cache_config=SimpleNamespace(cache_dtype=cache_dtype),
                           parallel_config=_PARALLEL)


@pytest.mark.parametrize("dtype, cache_dtype, nbytes", [
    (torch.bfloat16, "auto", 2),
    (torch.float16, None, 2),
    (torch.float32, "auto", 4),
    (torch.bfloat16, "fp8", 1),
    (torch.bfloat16, "fp8_e4m3", 1),
    (torch.float32, "bfloat16", 2),
])
def test_model_shape_from_vllm_config(dtype, cache_dtype, nbytes):
    cfg = _vllm_config(cache_dtype=cache_dtype, dtype=dtype, layers=10, kv_heads=4,
                       head_dim=96, image=224, patch=16)
    shape = usage.ModelShape.from_vllm_config(cfg)
    assert shape.tokens_per_image == 14 * 14
    assert shape.kv_bytes_per_token == 2 * 10 * 4 * 96 * nbytes


# ---------------------------------------------------------------- count_images / request_spec


def test_count_images_over_messages_and_part_types():
    body = {"messages": [
        {"role": "system", "content": "plain text content"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:..."}},
            {"type": "image_url", "image_url": {"url": "http://x"}},
        ]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [
            {"type": "input_image", "image_url": "x"},
            {"type": "image_pil", "image_pil": None},
            {"type": "image", "image": "y"},
            {"type": "audio_url", "audio_url": {"url": "a"}},
            {"type": "video_url", "video_url": {"url": "v"}},
            {"type": "image_embeds"},
            "a bare string part",
        ]},
        "not a message",
    ]}
    assert usage.count_images(body) == 2 + 3


def test_count_images_without_messages():
    assert usage.count_images({}) == 0
    assert usage.count_images({"prompt": "hi"}) == 0
    assert usage.count_images({"messages": None}) == 0
    assert usage.count_images({"messages": [{"role": "user", "content": "hi"}]}) == 0


def test_request_spec_override_and_server_default():
    server = spec_mod.parse("resprune:64")
    assert usage.request_spec({}, server) is server
    assert usage.request_spec({"mm_processor_kwargs": None}, server) is server
    assert usage.request_spec({"mm_processor_kwargs": {"other": 1}}, server) is server
    got = usage.request_spec({"mm_processor_kwargs": {"vtprune": "divprune:0.5"}}, server)
    assert (got.method, got.budget) == ("divprune", 0.5)
    # A request may switch pruning off on a pruning server...
    assert usage.request_spec({"mm_processor_kwargs": {"vtprune": "none"}}, server) is None
    # ...or on, on a plain one.
    got = usage.request_spec({"mm_processor_kwargs": {"vtprune": "dcp:16"}}, None)
    assert (got.method, got.budget) == ("dcp", 16)
    assert usage.request_spec({}, None) is None
    with pytest.raises(ValueError):
        usage.request_spec({"mm_processor_kwargs": {"vtprune": "resprune:zero"}}, server)


# ---------------------------------------------------------------- ASGI middleware


def _scope(path="/v1/chat/completions", method="POST", vllm_config=None, with_app=True):
    scope = {"type": "http", "method": method, "path": path, "headers": []}
    if with_app:
        cfg = vllm_config if vllm_config is not None else _vllm_config(vtprune="resprune:64")
        scope["app"] = SimpleNamespace(state=SimpleNamespace(vllm_config=cfg))
    return scope


def _receiver(body: bytes, pieces: int = 2):
    step = max(1, len(body) // pieces)
    chunks = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]

    async def receive():
        if messages:
            return messages.pop(0)
        return {"type": "http.disconnect"}

    return receive


async def _read_all(receive) -> bytes:
    data, more = b"", True
    while more:
        m = await receive()
        data += m.get("body", b"")
        more = m.get("more_body", False)
    return data


class _Endpoint:
    """Stand-in for vLLM: records the request body, answers with scripted messages."""

    def __init__(self, status, headers, bodies):
        self.status, self.headers, self.bodies = status, headers, bodies
        self.received = None
        self.calls = []

    async def __call__(self, scope, receive, send):
        self.calls.append((scope, receive, send))
        if scope["type"] == "http" and scope.get("method") == "POST":
            self.received = await _read_all(receive)
        await send({"type": "http.response.start", "status": self.status,
                    "headers": list(self.headers)})
        for i, b in enumerate(self.bodies):
            await send({"type": "http.response.body", "body": b,
                        "more_body": i < len(self.bodies) - 1})


def _run(app, scope, body: bytes):
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, _receiver(body), send))
    return sent


def _body_of(sent):
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _headers_of(sent):
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], [(k.lower(), v) for k, v in start["headers"]]


CHAT_REQUEST = {
    "model": "m",
    "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "what color is the circle ?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}},
    ]}],
}
CHAT_RESPONSE = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "red \u00e9"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1200, "completion_tokens": 2, "total_tokens": 1202},
}


def _expected(method, budget, images, kept_per_image, per_image=TOKENS, kv=KV_BYTES):
    before = images * per_image
    after = images * kept_per_image
    return {"method": method, "budget": budget, "images": images,
            "visual_tokens_before": before, "visual_tokens_after": after,
            "kv_cache_tokens_saved": before - after,
            "kv_cache_bytes_saved": (before - after) * kv}


def _json_endpoint(payload=CHAT_RESPONSE, status=200):
    raw = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(raw)).encode()), (b"x-request-id", b"abc")]
    # Body in two pieces, split mid-JSON.
    return _Endpoint(status, headers, [raw[:17], raw[17:]]), raw


def test_middleware_json_response_gets_figures_and_content_length():
    endpoint, _ = _json_endpoint()
    app = usage.VTPruneUsageMiddleware(endpoint)
    request = json.dumps(CHAT_REQUEST).encode()
    sent = _run(app, _scope(), request)
    # The endpoint still sees the whole request body.
    assert endpoint.received == request
    status, headers = _headers_of(sent)
    body = _body_of(sent)
    assert status == 200
    lengths = [v for k, v in headers if k == b"content-length"]
    assert lengths == [str(len(body)).encode()]
    assert (b"x-request-id", b"abc") in headers
    payload = json.loads(body)
    # Server spec resprune:64 on two images.
    assert payload["usage"]["vtprune"] == _expected("resprune", 64, 2, 64)
    # Everything else is unchanged.
    payload["usage"].pop("vtprune")
    assert payload == CHAT_RESPONSE
    assert sent[-1].get("more_body", False) is False


def test_middleware_request_override_and_shape_from_config():
    endpoint, _ = _json_endpoint()
    cfg = _vllm_config(vtprune="resprune:64", dtype=torch.float32, layers=2, kv_heads=1,
                       head_dim=8, image=28, patch=14)
    app = usage.VTPruneUsageMiddleware(endpoint)
    req = dict(CHAT_REQUEST, mm_processor_kwargs={"vtprune": "divprune:0.5"})
    sent = _run(app, _scope(vllm_config=cfg), json.dumps(req).encode())
    payload = json.loads(_body_of(sent))
    # 2x2 patches per image, keep round(0.5 * 4) = 2; 2*2*1*8*4 = 128 bytes per token.
    assert payload["usage"]["vtprune"] == _expected("divprune", 0.5, 2, 2, per_image=4,
                                                    kv=128)


def test_middleware_server_without_spec_reports_none():
    endpoint, _ = _json_endpoint()
    app = usage.VTPruneUsageMiddleware(endpoint)
    sent = _run(app, _scope(vllm_config=_vllm_config()), json.dumps(CHAT_REQUEST).encode())
    assert json.loads(_body_of(sent))["usage"]["vtprune"] == _expected("none", None, 2, 576)


def _sse_events():
    def chunk(content, usage_value=None):
        return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"content": content},
                             "finish_reason": None}],
                "usage": usage_value}

    events = [
        b"data: " + json.dumps(chunk("")).encode(),
        b"data: " + json.dumps(chunk("re")).encode(),
        b"data: " + json.dumps(chunk("d \n\\n")).encode(),   # escaped newlines in JSON
        b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                                "model": "m", "choices": [],
                                "usage": {"prompt_tokens": 1200, "completion_tokens": 2,
                                          "total_tokens": 1202}}).encode(),
        b"data: [DONE]",
    ]
    return events, 3


def _sse_parse(stream: bytes):
    assert stream.endswith(b"\n\n")
    return stream[:-2].split(b"\n\n")


def _check_sse(pieces, events, usage_index, expected_fig):
    endpoint = _Endpoint(200, [(b"content-type", b"text/event-stream; charset=utf-8")],
                         pieces)
    app = usage.VTPruneUsageMiddleware(endpoint)
    req = dict(CHAT_REQUEST, stream=True, stream_options={"include_usage": True})
    sent = _run(app, _scope(), json.dumps(req).encode())
    status, headers = _headers_of(sent)
    assert status == 200
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")
    out = _sse_parse(_body_of(sent))
    assert len(out) == len(events)
    for i, (got, want) in enumerate(zip(out, events)):
        if i == usage_index:
            assert got.startswith(b"data: ")
            payload = json.loads(got[len(b"data: "):])
            assert payload["usage"]["vtprune"] == expected_fig
            payload["usage"].pop("vtprune")
            assert payload == json.loads(want[len(b"data: "):])
        else:
            assert got == want, i
    assert b"vtprune" not in b"".join(o for i, o in enumerate(out) if i != usage_index)


def test_middleware_sse_awkward_splits():
    events, usage_index = _sse_events()
    stream = b"".join(e + b"\n\n" for e in events)
    fig = _expected("resprune", 64, 2, 64)
    usage_start = stream.index(events[usage_index])
    cuts_list = [
        [len(stream)],                                   # one message
        [usage_start + 20, len(stream)],                 # mid usage JSON
        [stream.index(b"\n\n") + 1, len(stream)],        # between the two newlines
        [5, 6, 7, usage_start + 3, usage_start + 40, len(stream) - 1, len(stream)],
    ]
    for cuts in cuts_list:
        pieces, prev = [], 0
        for c in cuts:
            pieces.append(stream[prev:c])
            prev = c
        _check_sse(pieces, events, usage_index, fig)
    # Every single two-way split point.
    for cut in range(1, len(stream), 7):
        _check_sse([stream[:cut], stream[cut:]], events, usage_index, fig)
    # Byte-at-a-time plus an empty final message.
    _check_sse([stream[i:i + 1] for i in range(len(stream))] + [b""], events,
               usage_index, fig)


def test_middleware_non_200_passes_through_unchanged():
    endpoint, raw = _json_endpoint(status=400)
    app = usage.VTPruneUsageMiddleware(endpoint)
    before = REGISTRY.get_sample_value("vtprune_requests_total", {"method": "resprune"})
    sent = _run(app, _scope(), json.dumps(CHAT_REQUEST).encode())
    status, headers = _headers_of(sent)
    assert status == 400
    assert headers == [(k.lower(), v) for k, v in endpoint.headers]
    assert [m["body"] for m in sent if m["type"] == "http.response.body"] == [raw[:17],
                                                                              raw[17:]]
    after = REGISTRY.get_sample_value("vtprune_requests_total", {"method": "resprune"})
    assert before == after


def test_middleware_other_content_type_passes_through():
    raw = b"plain text with usage"
    endpoint = _Endpoint(200, [(b"content-type", b"text/plain")], [raw])
    app = usage.VTPruneUsageMiddleware(endpoint)
    sent = _run(app, _scope(), json.dumps(CHAT_REQUEST).encode())
    assert _body_of(sent) == raw


@pytest.mark.parametrize("path, method", [
    ("/v1/chat/completions", "GET"),
    ("/v1/models", "GET"),
    ("/v1/embeddings", "POST"),
    ("/tokenize", "POST"),
    ("/v1/chat/completions/extra", "POST"),
])
def test_middleware_other_paths_untouched(path, method):
    endpoint, raw = _json_endpoint()
    app = usage.VTPruneUsageMiddleware(endpoint)
    sent_messages = []

    async def send(message):
        sent_messages.append(message)

    receive = _receiver(json.dumps(CHAT_REQUEST).encode())
    # No "app" in the scope: the middleware must not even look at the model config.
    scope = _scope(path=path, method=method, with_app=False)
    asyncio.run(app(scope, receive, send))
    # The endpoint got the very same scope, receive and send objects.
    (got_scope, got_receive, got_send), = endpoint.calls
    assert got_scope is scope and got_receive is receive and got_send is send
    assert _body_of(sent_messages) == raw


def test_middleware_non_http_scope_untouched():
    calls = []

    async def inner(scope, receive, send):
        calls.append((scope, receive, send))

    app = usage.VTPruneUsageMiddleware(inner)
    scope = {"type": "lifespan"}

    async def receive():
        return {"type": "lifespan.startup"}

    async def send(message):
        pass

    asyncio.run(app(scope, receive, send))
    assert calls == [(scope, receive, send)]


def test_middleware_malformed_request_is_forwarded_without_figures():
    endpoint, raw = _json_endpoint()
    app = usage.VTPruneUsageMiddleware(endpoint)
    body = b"{not json"
    sent = _run(app, _scope(), body)
    assert endpoint.received == body
    assert _body_of(sent) == raw
    # Malformed per-request spec: same.
    endpoint, raw = _json_endpoint()
    app = usage.VTPruneUsageMiddleware(endpoint)
    req = json.dumps(dict(CHAT_REQUEST, mm_processor_kwargs={"vtprune": "bogus:1"})).encode()
    sent = _run(app, _scope(), req)
    assert endpoint.received == req
    assert _body_of(sent) == raw


def _metric(name, method):
    return REGISTRY.get_sample_value(name, {"method": method}) or 0.0


METRICS = ("vtprune_requests_total", "vtprune_visual_tokens_before_total",
           "vtprune_visual_tokens_after_total", "vtprune_kv_cache_tokens_saved_total",
           "vtprune_kv_cache_bytes_saved_total")


def test_middleware_prometheus_counters_json_and_sse():
    # random is used by no other test here, so its counters move only by this test.
    req = dict(CHAT_REQUEST, mm_processor_kwargs={"vtprune": "random:100"})
    before = {m: _metric(m, "random") for m in METRICS}

    endpoint, _ = _json_endpoint()
    _run(usage.VTPruneUsageMiddleware(endpoint), _scope(), json.dumps(req).encode())
    # Two images of 576 tokens, 100 kept each.
    step = {"vtprune_requests_total": 1,
            "vtprune_visual_tokens_before_total": 1152,
            "vtprune_visual_tokens_after_total": 200,
            "vtprune_kv_cache_tokens_saved_total": 952,
            "vtprune_kv_cache_bytes_saved_total": 952 * KV_BYTES}
    mid = {m: _metric(m, "random") for m in METRICS}
    assert {m: mid[m] - before[m] for m in METRICS} == step

    events, _ = _sse_events()
    stream = b"".join(e + b"\n\n" for e in events)
    endpoint = _Endpoint(200, [(b"content-type", b"text/event-stream")],
                         [stream[:50], stream[50:300], stream[300:]])
    _run(usage.VTPruneUsageMiddleware(endpoint), _scope(), json.dumps(req).encode())
    after = {m: _metric(m, "random") for m in METRICS}
    assert {m: after[m] - mid[m] for m in METRICS} == step

    # A failed request counts nothing.
    endpoint, _ = _json_endpoint(status=500)
    _run(usage.VTPruneUsageMiddleware(endpoint), _scope(), json.dumps(req).encode())
    assert {m: _metric(m, "random") for m in METRICS} == after


def test_methods_inside_the_llm_report_what_they_skip_apart_from_what_they_save():
    """FastV at K=1 of 8 layers keeps 64 of 576 from layer 1 on: the layer average is
    (576 + 7 * 64) / 8 and 576 * 8 minus the processed token-layers are skipped; nothing
    is physically saved. Polymorphic's stage 1 saves KV (576 -> 128 per image) and its
    stage 2 brings the layer average to the budget (rounding of the per-layer counts
    aside)."""
    shape = usage.ModelShape(576, KV_BYTES, num_layers=8)
    fig = usage.figures(spec_mod.parse("fastv:64"), 1, shape)
    assert fig["kv_cache_tokens_saved"] == 0 and fig["visual_tokens_after"] == 576
    assert fig["inside_llm"] == {"visual_tokens_layer_average": (576 + 7 * 64) / 8,
                                 "token_layers_skipped": 576 * 8 - (576 + 7 * 64),
                                 "kv_cache_tokens_freed": 0}
    fig = usage.figures(spec_mod.parse("polymorphic:64"), 2, shape)
    assert fig["kv_cache_tokens_saved"] == 2 * (576 - 128)
    assert abs(fig["inside_llm"]["visual_tokens_layer_average"] - 2 * 64) <= 2
    assert fig["inside_llm"]["token_layers_skipped"] > 0
    assert "inside_llm" not in usage.figures(spec_mod.parse("resprune:64"), 1, shape)


# ---------------------------------------------------------------- figures as decided
def _trusted_scope(trusted=True):
    scope = _scope()
    scope["app"].state.online_renderer = SimpleNamespace(trust_request_mm_kwargs=trusted)
    return scope


class _DecidingEndpoint(_Endpoint):
    """Answers like vLLM after its processor recorded counts under the request's tag."""

    def __init__(self, before, after, **kw):
        raw = json.dumps(CHAT_RESPONSE).encode()
        super().__init__(200, [(b"content-type", b"application/json")], [raw])
        self.decision = decisions.Decision("resprune", 64, tuple(before), tuple(after))
        self.tag = None

    async def __call__(self, scope, receive, send):
        body = json.loads(await _read_all(receive))
        self.tag = body["mm_processor_kwargs"][decisions.REQUEST_KEY]
        decisions.record(self.tag, self.decision)
        self.received = body
        for message in [{"type": "http.response.start", "status": 200,
                         "headers": self.headers}] + [
                {"type": "http.response.body", "body": b, "more_body": False}
                for b in self.bodies]:
            await send(message)


def test_figures_come_from_what_the_processor_decided():
    # Counts no formula on the config gives (an image-size-dependent family, say).
    endpoint = _DecidingEndpoint(before=[1000, 300], after=[64, 64])
    request = dict(CHAT_REQUEST, mm_processor_kwargs={"vtprune": "resprune:64"})
    sent = _run(VTPruneUsageMiddleware(endpoint), _trusted_scope(), json.dumps(request).encode())
    fig = json.loads(_body_of(sent))["usage"]["vtprune"]
    assert fig["visual_tokens_before"] == 1300 and fig["visual_tokens_after"] == 128
    assert fig["images"] == 2 and fig["kv_cache_tokens_saved"] == 1300 - 128
    assert fig["kv_cache_bytes_saved"] == (1300 - 128) * KV_BYTES
    assert endpoint.received["mm_processor_kwargs"]["vtprune"] == "resprune:64"
    assert decisions.take(endpoint.tag) is None, "the decision was left behind"


def test_untrusted_server_is_not_tagged_and_falls_back_to_the_spec():
    endpoint, _ = _json_endpoint()
    sent = _run(VTPruneUsageMiddleware(endpoint), _trusted_scope(False),
                json.dumps(CHAT_REQUEST).encode())
    assert "mm_processor_kwargs" not in json.loads(endpoint.received)
    assert json.loads(_body_of(sent))["usage"]["vtprune"] == _expected("resprune", 64, 2, 64)


def test_abandoned_request_null_body_passes_without_error():
    """vLLM answers a request whose client went away with a JSON null body."""
    endpoint = _Endpoint(200, [(b"content-type", b"application/json")], [b"null"])
    sent = _run(VTPruneUsageMiddleware(endpoint), _trusted_scope(),
                json.dumps(CHAT_REQUEST).encode())
    assert _body_of(sent) == b"null"
    tag = json.loads(endpoint.received)["mm_processor_kwargs"][decisions.REQUEST_KEY]
    assert decisions.take(tag) is None


def test_decisions_for_unexpected_or_abandoned_tags_are_not_kept():
    d = decisions.Decision("resprune", 64, (576,), (64,))
    decisions.record("never-tagged", d)  # a tag sent to another endpoint
    assert decisions.take("never-tagged") is None
    decisions.expect("abandoned")
    assert decisions.take("abandoned") is None  # the middleware gave up on it...
    decisions.record("abandoned", d)  # ...before the processor finished
    assert decisions.take("abandoned") is None
