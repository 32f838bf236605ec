"""Pruning inside vLLM's decoder: the layer loop, per-step state and per-request plans.

A server started with a method that acts inside the LLM (``--vtprune fastv:64``,
``polymorphic:64``, ``rcp:64,ckpt=...``) gets this loop in place of ``LlamaModel.forward``
(gpt-fast style, explicit over the layers) and the masked attention of
:mod:`vllm_vtprune.models.masked_attention` in its decoder layers. Each request then
runs its own spec's :class:`vllm_vtprune.llm_loop.Plan`, the very object the transformers
reference loop runs:

* **Which tokens are whose.** vLLM's attention metadata says which rows of the step
  belong to which request (``query_start_loc``, ``seq_lens``, ``block_table``); which
  rows are image tokens, and under which spec, comes from ``embed_input_ids``: each
  image's embeddings are a slice of the tensor ``embed_multimodal`` returned (the
  encoder cache stores it as is), whose storage was registered with its spec. So
  per-request specs of any method, and none, mix in one batch.
* **Decisions** are taken on whole-prompt prefills (chunked prefill and the prefix
  cache are refused at startup), before layer ``l``, from layer ``l-1``'s attention
  (captured by the masked attention for the requests that need it) and the residual
  stream entering ``l``. A pruned token's KV slot gets prune level ``l`` (the first
  layer that no longer sees it); the masked attention hides it from every later query
  of every deeper layer, in this prefill and in every decode step (cumulative).
* **Compute.** With ``skip_rows`` (the default), pruned rows leave the batch before
  layer ``l``: their QKV, attention and MLP work at deeper layers is not done and their
  deeper KV is never written (the slots stay allocated: vLLM's block manager frees
  whole requests only). The masked attention maps the remaining rows back to their
  slots and positions. Without it every row runs every layer, masked (the bench's
  "mask only" arm).
* **Adapters** (RCP's repair adapters) act after their layer on the answer rows: the
  last prompt row in prefill, every decoded row. A request's plan is kept, keyed by the
  KV slot of its first token, from its prefill to its last decode step, and dropped at
  the first step without that request (it ended, or was preempted and will be decided
  again); prune levels live in the KV slots, reset when a new token's layer 0 writes.
* **Preemption.** vLLM recomputes a preempted request with one prefill over its prompt
  and its output so far. The runner's prompt lengths (:func:`install_runner_hook`) let
  the decisions read the prompt only and the adapters act on every output row, so the
  rebuilt state is the one the request had.

Per-step state lives in :data:`STEP`, a small object the loop and the attention read,
so no vLLM signature changes (nano-vllm's context pattern).
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
from torch import Tensor

NEVER = 255  # prune level of a slot no decision touched


@dataclasses.dataclass
class RequestRows:
    index: int  # position in the step's metadata
    q0: int  # its rows in the step: [q0, q1)
    q1: int
    seq_len: int
    first_slot: int  # KV slot of its first token: the request's key for its plan
    prompt_len: int = 0  # a recomputed (preempted) request's prefill also holds its output
    fingerprint: float = 0.0  # sum of its prompt embeddings ($VTPRUNE_TRACE only)
    plan: object | None = None  # vllm_vtprune.llm_loop.Plan

    @property
    def whole_prefill(self) -> bool:
        return self.q1 - self.q0 == self.seq_len


@dataclasses.dataclass
class StepState:
    """Server configuration (set when the model is built) and the current step's state."""

    num_layers: int = 0
    block_size: int = 16
    skip_rows: bool = True
    active: bool = False  # a model with pruning inside the LLM was built in this process
    #: prompt length of each request of the step, in batch order (the runner's, see
    #: :func:`install_runner_hook`); None: every prefill is taken as all prompt
    prompt_lens: list[int] | None = None
    #: set by ``embed_input_ids`` for the next forward: ([num_tokens] bool image rows,
    #: [(spec string or None, token count, patches its budget is a share of)] per image
    #: in row order)
    images: tuple[Tensor, list[tuple[str | None, int, int]]] | None = None
    # -- the step being run
    requests: list[RequestRows] = dataclasses.field(default_factory=list)
    rows: Tensor | None = None  # original row of each current row (None: all, in order)
    device: torch.device = torch.device("cpu")  # the step's hidden states'
    slot_mapping: Tensor | None = None
    capture: dict[int, set[int]] = dataclasses.field(default_factory=dict)
    probs: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    keys: dict[tuple, tuple] = dataclasses.field(default_factory=dict)  # per request
    # -- persistent across steps
    plans: dict[int, object] = dataclasses.field(default_factory=dict)
    levels: Tensor | None = None  # [num_slots] uint8
    recomputed: int = 0  # prefills of preempted requests (prompt plus output) seen so far

    def configure(self, num_layers: int, block_size: int, skip_rows: bool = True) -> None:
        self.num_layers = num_layers
        self.block_size, self.skip_rows = block_size, skip_rows
        self.images, self.plans, self.levels = None, {}, None
        self.active = True
        install_runner_hook()

    def prune_levels(self, num_slots: int) -> Tensor:
        if self.levels is None or self.levels.shape[0] != num_slots:
            self.levels = torch.full((num_slots,), NEVER, dtype=torch.uint8, device=self.device)
        return self.levels


STEP = StepState()


#: storage address -> (weak reference to the tagged tensor, spec, the image's patches);
#: views made under inference mode record no ``_base``, so slices are matched by the
#: storage they share
_TAGS: dict[int, tuple[weakref.ref, str | None, int]] = {}


# ------------------------------------------------------------------ serving setup
#: hf_overrides key: "skip" (default) takes pruned rows out of the decoder's batch, "mask"
#: only hides them (the latency bench's comparison arm)
ROWS_KEY = "vtprune_rows"


def check_serving(vllm_config, spec, family) -> None:
    """Refuse the settings under which a decision inside the LLM cannot be taken, and a
    spec that does not fit this decoder (a layer beyond its depth, a foreign checkpoint)."""
    from vllm.config import CompilationMode

    from vllm_vtprune import families, pipeline

    if vllm_config.scheduler_config.enable_chunked_prefill:
        raise ValueError(f"vtprune {spec}: chunked prefill could split an image from its "
                         "question; accepted: --no-enable-chunked-prefill")
    if str(vllm_config.cache_config.cache_dtype or "auto") != "auto":
        raise ValueError(f"vtprune {spec}: the masked attention stores K/V unquantised; "
                         f"accepted: --kv-cache-dtype auto (got "
                         f"{vllm_config.cache_config.cache_dtype})")
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(f"vtprune {spec}: the prefix cache would share pruned KV between "
                         "prompts; accepted: --no-enable-prefix-caching")
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        raise ValueError(f"vtprune {spec}: the decoder's per-request decisions run in "
                         "Python between layers, which a compiled graph would freeze; "
                         "accepted: --enforce-eager")
    hf = vllm_config.model_config.hf_config
    pipeline.check_fits_decoder(spec, hf.text_config.num_hidden_layers,
                                hf.text_config.hidden_size,
                                families.image_tokens(family.FAMILY, hf))


@contextlib.contextmanager
def masked_attention(vllm_config, spec, family):
    """While the model is built, its decoder layers get the masked attention backend
    (``spec`` prunes inside the LLM); other models built later in this process keep
    vLLM's own. ``family``: the served model's (its per-tile grid sizes the checks)."""
    from vllm.v1.attention.backends import registry as backends
    from vllm.v1.attention.selector import _cached_get_attn_backend

    from vllm_vtprune.models import masked_attention as backend

    check_serving(vllm_config, spec, family)
    hf = vllm_config.model_config.hf_config
    STEP.configure(hf.text_config.num_hidden_layers, vllm_config.cache_config.block_size,
                   skip_rows=getattr(hf, ROWS_KEY, "skip") != "mask")
    enum = backends.AttentionBackendEnum.CPU_ATTN
    previous = backends._ATTN_OVERRIDES.get(enum)
    backends.register_backend(enum, f"{backend.__name__}.VTPruneCPUAttentionBackend")
    _cached_get_attn_backend.cache_clear()  # an earlier engine in this process chose one
    try:
        yield
    finally:
        if previous is None:
            backends._ATTN_OVERRIDES.pop(enum, None)
        else:
            backends._ATTN_OVERRIDES[enum] = previous
        _cached_get_attn_backend.cache_clear()


def install_decoder(decoder) -> None:
    """``decoder`` (the model's ``LlamaModel``) runs :func:`decoder_forward` from now on."""
    import types

    decoder.forward = types.MethodType(decoder_forward, decoder)


_HOOKED = False


def install_runner_hook() -> None:
    """Let each step know its requests' prompt lengths. A preempted request is
    recomputed by a prefill over its prompt and the tokens it has generated; the
    decisions must read the prompt only (FastV's last prompt token, the text after an
    image) and the adapters act on every generated row, so the rebuilt KV is the one the
    request had. vLLM's attention metadata has no prompt lengths; its model runner's
    input batch has them, in the order of the step's requests."""
    global _HOOKED
    if _HOOKED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward

    def _model_forward(self, *args, **kwargs):
        if STEP.active:
            batch = self.input_batch
            STEP.prompt_lens = batch.num_prompt_tokens[:batch.num_reqs].tolist()
        try:
            return original(self, *args, **kwargs)
        finally:
            STEP.prompt_lens = None

    GPUModelRunner._model_forward = _model_forward
    _HOOKED = True


def tag_of(embedding: Tensor) -> tuple[str | None, int]:
    """(spec, patches) ``embed_multimodal`` tagged an image's embeddings with ((None, 0)
    if none); a slice of them (what the runner gathers from its encoder cache) shares
    their storage."""
    entry = _TAGS.get(embedding.untyped_storage().data_ptr())
    if entry is None or entry[0]() is None:
        return None, 0
    return entry[1], entry[2]


def spec_of(embedding: Tensor) -> str | None:
    return tag_of(embedding)[0]


def tag(embeddings: Tensor, spec, patches: int = 0) -> Tensor:
    """``embeddings`` in a storage of their own, registered with ``spec`` and the
    image's unpruned patch count (see :func:`tag_of`)."""
    whole = embeddings.numel() * embeddings.element_size()
    out = embeddings if embeddings.untyped_storage().nbytes() == whole else embeddings.clone()
    for key in [k for k, (ref, *_) in _TAGS.items() if ref() is None]:
        del _TAGS[key]
    _TAGS[out.untyped_storage().data_ptr()] = (weakref.ref(out), str(spec) if spec else None,
                                               int(patches))
    return out


def record_images(is_multimodal: Tensor | None, embeddings) -> None:
    """What ``embed_input_ids`` knows about this step's image rows, for the loop."""
    if is_multimodal is None or not embeddings:
        STEP.images = None
        return
    STEP.images = (is_multimodal.cpu(), [_entry(e) for e in embeddings])


def _entry(embedding: Tensor) -> tuple[str | None, int, int]:
    spec, patches = tag_of(embedding)
    return spec, embedding.shape[0], patches


# ------------------------------------------------------------------ the step
def _metadata():
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):
        md = md[0] if md else None
    if isinstance(md, dict):
        md = next(iter(md.values()), None)
    return md


def _image_runs(num_rows: int) -> list[tuple[int, int, str | None, int]]:
    """(first row, end row, spec, patches) of each image in this step."""
    if STEP.images is None:
        return []
    mask, images = STEP.images
    STEP.images = None  # consumed: a later step without images must not see these
    rows = torch.nonzero(mask[:num_rows]).flatten().tolist()
    runs, at = [], 0
    for spec, n, patches in images:
        if at + n > len(rows):
            break
        runs.append((rows[at], rows[at + n - 1] + 1, spec, patches))
        at += n
    return runs


def _plan_for(spec_text: str | None, spans: list[tuple[int, int]], patches: list[int]):
    from vllm_vtprune import pipeline, registry
    from vllm_vtprune import spec as spec_mod

    if not spec_text or spec_text == "none":
        return None
    spec = spec_mod.parse(spec_text)
    if not pipeline.acts_in_llm(spec):
        return None
    return registry.get(spec.method).llm_plan(spec, spans, STEP.num_layers, patches)


def begin_step(num_rows: int, embeds: Tensor | None = None) -> None:
    """Per-request rows, plans and the layers whose attention must be kept."""
    STEP.requests, STEP.rows, STEP.capture, STEP.probs = [], None, {}, {}
    STEP.keys = {}
    if embeds is not None:
        STEP.device = embeds.device
    runs = _image_runs(num_rows)
    md = _metadata()
    if md is None:
        STEP.slot_mapping = None
        return
    STEP.slot_mapping = md.slot_mapping
    starts = md.query_start_loc.tolist()
    seq_lens = md.seq_lens.tolist()
    for r, seq_len in enumerate(seq_lens):
        q0, q1 = starts[r], starts[r + 1]
        if q1 <= q0:
            continue
        req = RequestRows(r, q0, q1, seq_len, int(md.block_table[r, 0]) * STEP.block_size)
        prompts = STEP.prompt_lens
        req.prompt_len = min(seq_len, prompts[r]) if prompts and r < len(prompts) else seq_len
        if req.whole_prefill:  # a new request (or a recomputed one) on this slot
            STEP.recomputed += req.prompt_len < seq_len
            if embeds is not None and _tracing():
                req.fingerprint = round(float(embeds[q0:q0 + req.prompt_len].double().sum()), 6)
            mine = [(a - q0, b - q0, s, p) for a, b, s, p in runs if q0 <= a < q1]
            req.plan = (_plan_for(mine[0][2], [(a, b) for a, b, *_ in mine],
                                  [p for *_, p in mine]) if mine else None)
            STEP.plans.pop(req.first_slot, None)
            if req.plan is not None and req.plan.adapters:
                STEP.plans[req.first_slot] = req.plan
            for layer in (req.plan.decisions if req.plan is not None else ()):
                STEP.capture.setdefault(layer - 1, set()).add(r)
        else:
            req.plan = STEP.plans.get(req.first_slot)
        STEP.requests.append(req)
    # Without chunked prefill every running request is in every step (a preempted one is
    # decided again when recomputed): a plan whose request is absent has ended.
    live = {q.first_slot for q in STEP.requests}
    for slot in [s for s in STEP.plans if s not in live]:
        del STEP.plans[slot]


def _current(req: RequestRows) -> Tensor:
    """Indices of ``req``'s rows among the current rows."""
    if STEP.rows is None:
        return torch.arange(req.q0, req.q1, device=STEP.device)
    return torch.nonzero((STEP.rows >= req.q0) & (STEP.rows < req.q1)).flatten()


def _original(current: Tensor) -> Tensor:
    return current if STEP.rows is None else STEP.rows[current]


def decide(layer: int, hidden: Tensor, residual: Tensor | None, positions: Tensor,
           alive: Tensor):
    """Run the decisions taken before ``layer``; returns the new (hidden, residual,
    positions, alive) for the rows that go on."""
    from vllm_vtprune.llm_loop import LayerView
    from vllm_vtprune.models import parallel

    deciding = [q for q in STEP.requests if q.plan is not None and layer in q.plan.decisions
                and q.index in STEP.probs]
    if not deciding:
        return hidden, residual, positions, alive
    x = hidden if residual is None else hidden + residual
    levels = STEP.levels
    for req in deciding:
        cur = _current(req)
        live_q = torch.nonzero(alive[cur]).flatten()
        local = _original(cur[live_q]) - req.q0  # positions (whole prefill)
        live_q = live_q[local < req.prompt_len]  # the prompt, not recomputed output
        live, local = cur[live_q], local[local < req.prompt_len]
        probs = parallel.gather_heads(STEP.probs.pop(req.index))  # every head, any TP
        view = LayerView(probs[:, live_q][:, :, local], local, x[live])
        verdict = req.plan.decisions[layer](view)
        _trace(req, layer, local[verdict.keep])  # this rank's own verdict
        verdict = parallel.agree_verdict(verdict)
        if verdict.hidden is not None:
            x[live[verdict.keep]] = verdict.hidden.to(x.dtype)
        dropped = torch.ones(len(live), dtype=torch.bool, device=live.device)
        dropped[verdict.keep] = False
        slots = STEP.slot_mapping[_original(live[dropped])].long()
        levels[slots] = layer
        alive[live[dropped]] = False
    if STEP.skip_rows:
        STEP.rows = _original(torch.nonzero(alive).flatten())
        # [..., rows]: M-RoPE positions are [3, T]
        return x[alive], None, positions[..., alive], alive[alive]
    return x, None, positions, alive


def _tracing() -> str | None:
    import os

    return os.environ.get("VTPRUNE_TRACE")


def _trace(req: RequestRows, layer: int, kept: Tensor) -> None:
    """Append a decision to ``$VTPRUNE_TRACE`` (JSON lines): which prompt positions a
    request kept before ``layer`` (this rank's own verdict under tensor parallelism);
    tests compare a preempted request's recomputed decisions with its first ones."""
    path = _tracing()
    if not path:
        return
    import json

    from vllm_vtprune.models import parallel

    with open(path, "a") as f:
        f.write(json.dumps({"in_llm": True, "rank": parallel.tp_rank(), "layer": layer,
                            "prompt": req.fingerprint,
                            "prompt_len": req.prompt_len, "recomputed": req.prompt_len < req.seq_len,
                            "kept": kept.tolist()}) + "\n")


def adapt(layer: int, hidden: Tensor, residual: Tensor | None):
    """Repair adapters after ``layer`` on the answer rows of the requests that have them."""
    adapting = [q for q in STEP.requests if q.plan is not None and layer in q.plan.adapters]
    if not adapting:
        return hidden, residual
    x = hidden if residual is None else hidden + residual
    for req in adapting:
        cur = _current(req)
        # answer rows: the last prompt row and every generated one (recomputed or new)
        rows = cur[_original(cur) - req.q0 >= req.prompt_len - 1] if req.whole_prefill else cur
        x[rows] = req.plan.adapters[layer](x[rows])
    return x, None


def restore(hidden: Tensor, num_rows: int) -> Tensor:
    """Rows pruned on the way get zeros (no logits are read there: they are image rows)."""
    if STEP.rows is None:
        return hidden
    out = hidden.new_zeros(num_rows, hidden.shape[1])
    out[STEP.rows] = hidden
    STEP.rows = None
    return out


def decoder_forward(model, input_ids, positions, intermediate_tensors=None,
                    inputs_embeds=None, **kwargs):
    """``LlamaModel.forward`` (``Qwen2Model``'s is the same) with the plans of the step's
    requests (pipeline parallelism and auxiliary hidden states are not used on the
    served families)."""
    hidden = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
    num_rows = hidden.shape[0]
    begin_step(num_rows, hidden)
    alive = torch.ones(num_rows, dtype=torch.bool, device=hidden.device)
    residual = None
    for idx, layer in enumerate(model.layers[model.start_layer:model.end_layer],
                                start=model.start_layer):
        hidden, residual, positions, alive = decide(idx, hidden, residual, positions, alive)
        hidden, residual = layer(positions, hidden, residual, **kwargs)
        hidden, residual = adapt(idx, hidden, residual)
    hidden = model.norm(hidden) if residual is None else model.norm(hidden, residual)[0]
    return restore(hidden, num_rows)
