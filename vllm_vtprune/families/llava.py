"""LLaVA-1.5 (``llava-hf/llava-1.5-*`` layout): a CLIP tower with a CLS token, a square
patch grid (24 x 24 for ViT-L/14 at 336 px), LLaVA's "default" feature strategy (CLS
dropped at the feature layer), one fixed placeholder count per image, and the
``USER: ... ASSISTANT:`` conversation of its chat template.

Holds every LLaVA-1.5 assumption of the package: config matching, the tower adapters for
vLLM's and transformers' CLIP (:class:`VllmClipTower`, :class:`HfClipTower`), the grid,
and where a prompt's question is.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vllm_vtprune.families import Family
from vllm_vtprune.pipeline import Probe

ARCHITECTURE = "VTPruneLlavaForConditionalGeneration"
CLS_TOKENS = 1  # CLIP puts one CLS token before the patches
# The conversation format of llava-hf's chat template, used when a tokenizer has none.
DEFAULT_ROLES = ("USER:", "ASSISTANT:")
_SENTINEL = "\x1f"


def _heads(x: Tensor, num_heads: int) -> Tensor:
    m = x.shape[1]
    return x[0].float().view(m, num_heads, x.shape[-1] // num_heads).transpose(0, 1)


#: Query rows per block of the full probe: a block's [H, rows, M] logits stay in cache for
#: the softmax and the product with the values (2x faster than the whole matrix at M = 577).
PROBE_BLOCK = 128


def _attention_probe(q: Tensor, k: Tensor, v: Tensor | None, num_heads: int,
                     full: bool) -> Probe:
    """Softmax(q k^T / sqrt(d)) of the CLS query; with ``full``, also every query's row
    averaged over heads, the values and the attention output, a block of rows at a time.

    q, k, v: [1, M, H*d] projections of the layer's normalised input.
    """
    qh, kh = _heads(q, num_heads), _heads(k, num_heads)
    qh = qh * qh.shape[-1] ** -0.5  # scaled before: [M, d], not [M, M]
    kt = kh.transpose(1, 2)
    if not full:
        return Probe(cls_attn=torch.softmax(qh[:, :1] @ kt, dim=-1)[:, 0], keys=kh)
    vh = _heads(v, num_heads)
    m = qh.shape[1]
    mean = qh.new_empty((m, m))
    context = torch.empty_like(vh)
    for r in range(0, m, PROBE_BLOCK):
        rows = torch.softmax(qh[:, r:r + PROBE_BLOCK] @ kt, dim=-1)  # [H, rows, M]
        context[:, r:r + PROBE_BLOCK] = rows @ vh
        mean[r:r + PROBE_BLOCK] = rows.mean(dim=0)
        if r == 0:
            cls_attn = rows[:, 0].clone()
    return Probe(cls_attn=cls_attn, keys=kh, attn=mean, values=vh, context=context)


def _attend(probe: Probe, dtype: torch.dtype) -> Tensor:
    """The attention output [1, M, H*d] from the probe, so a layer whose attention is
    needed is computed once."""
    out = probe.context
    return out.transpose(0, 1).reshape(1, out.shape[1], -1).to(dtype)


def _finish_layer(layer, hidden: Tensor, attn_out: Tensor, probe: Probe):
    """CLIP's residual attention branch and MLP: (after attention, layer output, probe)."""
    x_att = hidden + attn_out
    return x_att, x_att + layer.mlp(layer.layer_norm2(x_att)), probe


def clip_grid(vision_config) -> tuple[int, int]:
    side = vision_config.image_size // vision_config.patch_size
    return side, side


class VllmClipTower:
    """vLLM's ``CLIPVisionTransformer`` (truncated at the feature layer) one layer at a time."""

    prefix = CLS_TOKENS

    def __init__(self, vision_model, vision_config, complete=lambda probe: probe,
                 agree=lambda flag: flag):
        self.vm = vision_model
        self.num_layers = len(vision_model.encoder.layers)
        self.grid = clip_grid(vision_config)
        # completes a probe of this rank's heads over every tensor-parallel rank
        self.complete = complete
        self.agree = agree

    def embed(self, pixel_values: Tensor) -> Tensor:
        dtype = self.vm.embeddings.patch_embedding.weight.dtype
        return self.vm.pre_layrnorm(self.vm.embeddings(pixel_values.to(dtype)))

    def layer(self, i: int, hidden: Tensor) -> Tensor:
        return self.vm.encoder.layers[i](hidden)

    def _local_probe(self, layer, hidden: Tensor, full: bool) -> Probe:
        """The probe of this rank's heads (all of them without tensor parallelism)."""
        qkv, _ = layer.self_attn.qkv_proj(layer.layer_norm1(hidden))
        q, k, v = qkv.chunk(3, dim=-1)
        return _attention_probe(q, k, v, layer.self_attn.num_heads_per_partition, full)

    def probe(self, i: int, hidden: Tensor, full: bool = False) -> Probe:
        return self.complete(self._local_probe(self.vm.encoder.layers[i], hidden, full))

    keep = staticmethod(lambda origins: None)  # CLIP's layers ignore where patches stand

    def layer_probed(self, i: int, hidden: Tensor) -> tuple[Tensor, Tensor, Probe]:
        layer = self.vm.encoder.layers[i]
        probe = self._local_probe(layer, hidden, True)
        out, _ = layer.self_attn.out_proj(_attend(probe, hidden.dtype))  # this rank's heads
        return _finish_layer(layer, hidden, out, self.complete(probe))


class HfClipTower:
    """transformers' ``CLIPVisionTransformer`` up to LLaVA's feature layer."""

    prefix = CLS_TOKENS

    @staticmethod
    def agree(flag: bool) -> bool:
        return flag  # one process: nothing to agree with

    def __init__(self, vision_model, vision_config, feature_layer: int):
        self.vm = vision_model
        self.grid = clip_grid(vision_config)
        total = len(vision_model.encoder.layers)
        # hidden_states[feature_layer] is the output of this many layers.
        self.num_layers = feature_layer if feature_layer >= 0 else total + 1 + feature_layer

    def embed(self, pixel_values: Tensor) -> Tensor:
        dtype = self.vm.embeddings.patch_embedding.weight.dtype
        return self.vm.pre_layrnorm(self.vm.embeddings(pixel_values.to(dtype)))

    def layer(self, i: int, hidden: Tensor) -> Tensor:
        out = self.vm.encoder.layers[i](hidden, None)
        return out[0] if isinstance(out, tuple) else out

    def probe(self, i: int, hidden: Tensor, full: bool = False) -> Probe:
        return _hf_probe(self.vm.encoder.layers[i], hidden, full)

    keep = staticmethod(lambda origins: None)  # CLIP's layers ignore where patches stand

    def layer_probed(self, i: int, hidden: Tensor) -> tuple[Tensor, Tensor, Probe]:
        layer = self.vm.encoder.layers[i]
        probe = _hf_probe(layer, hidden, True)
        return _finish_layer(layer, hidden, layer.self_attn.out_proj(
            _attend(probe, hidden.dtype)), probe)


def _hf_probe(layer, hidden: Tensor, full: bool) -> Probe:
    x = layer.layer_norm1(hidden)
    attn = layer.self_attn
    return _attention_probe(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.num_heads,
                            full)


# ---------------------------------------------------------------- config
def matches(hf_config) -> bool:
    vision = getattr(hf_config, "vision_config", None)
    return (getattr(hf_config, "model_type", None) == "llava"
            and getattr(vision, "model_type", None) == "clip_vision_model")


def check(hf_config) -> None:
    strategy = hf_config.vision_feature_select_strategy
    if strategy != "default":
        raise ValueError(f"vtprune: LLaVA with vision_feature_select_strategy {strategy!r} "
                         "is not supported; supported: 'default'")


def grid(hf_config) -> tuple[int, int]:
    return clip_grid(hf_config.vision_config)


# ---------------------------------------------------------------- the question
def _render(tokenizer, turns: list[tuple[str, str]]) -> str | None:
    """The chat template on ``turns`` (role, text) with a generation prompt, content
    given as parts (llava-hf's templates iterate them) or, failing that, as strings;
    None without a template or when the texts do not come out verbatim."""
    for as_parts in (True, False):
        messages = [{"role": role, "content": [{"type": "text", "text": text}]
                     if as_parts else text} for role, text in turns]
        try:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)
        except Exception:  # no chat template, or one that refuses this form
            continue
        if all(text in out for _, text in turns):
            return out
    return None


def _strip_specials(tokenizer, text: str) -> str:
    for special in tokenizer.all_special_tokens:
        text = text.replace(special, "")
    return text.strip()


def role_markers(tokenizer) -> tuple[str, str]:
    """(user, assistant) role markers as the chat template writes them.

    Read off a two-turn render with sentinel texts: the user marker is what stands
    between the first answer and the second question (so a system preamble before the
    first turn is not part of it), the assistant marker what follows the last question.
    A tokenizer without a usable template gets llava-hf's format, ``DEFAULT_ROLES``.
    """
    q1, a1, q2 = (_SENTINEL + str(i) for i in range(3))
    text = _render(tokenizer, [("user", q1), ("assistant", a1), ("user", q2)])
    if text is None:
        return DEFAULT_ROLES
    user = _strip_specials(tokenizer, text.split(a1, 1)[1].split(q2, 1)[0])
    assistant = _strip_specials(tokenizer, text.rsplit(q2, 1)[1])
    return (user, assistant) if user and assistant else DEFAULT_ROLES


# Text a role marker may follow in a prompt: nothing, a space, a word, a line break.
_CONTEXTS = ("", " ", "a ", "\n", "a\n")


def _id_forms(tokenizer, marker: str) -> list[list[int]]:
    """Token ids ``marker`` can have inside a prompt, after each of ``_CONTEXTS`` and
    after the end-of-turn token (sub-word tokenizers write a word differently at the
    start, mid-sentence and after a line break)."""
    contexts = _CONTEXTS + ((tokenizer.eos_token,) if tokenizer.eos_token else ())
    forms = []
    for context in contexts:
        head = tokenizer.encode(context, add_special_tokens=False) if context else []
        both = tokenizer.encode(context + marker, add_special_tokens=False)
        if both[:len(head)] == head and both[len(head):] not in forms:
            forms.append(both[len(head):])
    return [f for f in forms if f]


def _marker_forms(tokenizer):
    """The id forms of both markers, kept on the tokenizer (it lives as long as the
    server) per chat template, so every request does not re-render the template."""
    try:
        cache = vars(tokenizer).setdefault("_vtprune_marker_forms", {})
    except TypeError:  # a tokenizer with __slots__: no cache
        cache = {}
    key = str(getattr(tokenizer, "chat_template", None))
    if key not in cache:
        cache[key] = tuple(_id_forms(tokenizer, m) for m in role_markers(tokenizer))
    return cache[key]


def _find(ids: list[int], forms: list[list[int]], start: int = 0) -> list[tuple[int, int]]:
    """(start, end) of every occurrence of any form in ``ids[start:]``."""
    return [(i, i + len(f)) for i in range(start, len(ids)) for f in forms
            if ids[i:i + len(f)] == f]


def question_ids(tokenizer, prompt_ids: list[int]) -> list[int]:
    """Token ids of the last user turn of a LLaVA prompt (role markers excluded).

    Found on token ids, with the markers as this tokenizer writes them, so a
    lower-casing tokenizer's ``user`` is a role marker where it is one and a word where
    it is one. A prompt without markers is all question.
    """
    user_forms, assistant_forms = _marker_forms(tokenizer)
    users = _find(prompt_ids, user_forms)
    start = max(end for _, end in users) if users else 0
    answers = _find(prompt_ids, assistant_forms, start)
    stop = min(begin for begin, _ in answers) if answers else len(prompt_ids)
    return list(prompt_ids[start:stop])


FAMILY = Family(
    name="LLaVA-1.5",
    description="model_type 'llava' with a CLIP vision tower, e.g. llava-hf/llava-1.5-7b-hf",
    architecture=ARCHITECTURE,
    vllm_class="vllm_vtprune.models.llava:VTPruneLlavaForConditionalGeneration",
    matches=matches,
    check=check,
    grid=grid,
    question_ids=question_ids,
    provides=frozenset({"cls_attention", "keys", "encoder_layers", "text", "llm_attention"}),
    images="one CLIP pass: 576 patches at 336 px; a budget of K keeps K of them",
)
