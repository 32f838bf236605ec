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


def _attention_probe(q: Tensor, k: Tensor, v: Tensor | None, num_heads: int,
                     full: bool) -> Probe:
    """Softmax(q k^T / sqrt(d)) of the CLS query (and of all queries when ``full``).

    q, k, v: [1, M, H*d] projections of the layer's normalised input.
    """
    qh, kh = _heads(q, num_heads), _heads(k, num_heads)
    rows = qh if full else qh[:, :1]
    attn = torch.softmax(rows @ kh.transpose(1, 2) * qh.shape[-1] ** -0.5, dim=-1)
    values = _heads(v, num_heads) if full and v is not None else None
    return Probe(cls_attn=attn[:, 0], keys=kh, attn=attn if full else None, values=values)


def clip_grid(vision_config) -> tuple[int, int]:
    side = vision_config.image_size // vision_config.patch_size
    return side, side


class VllmClipTower:
    """vLLM's ``CLIPVisionTransformer`` (truncated at the feature layer) one layer at a time."""

    prefix = CLS_TOKENS

    def __init__(self, vision_model, vision_config):
        self.vm = vision_model
        self.num_layers = len(vision_model.encoder.layers)
        self.grid = clip_grid(vision_config)

    def embed(self, pixel_values: Tensor) -> Tensor:
        return self.vm.pre_layrnorm(self.vm.embeddings(pixel_values))

    def layer(self, i: int, hidden: Tensor) -> Tensor:
        return self.vm.encoder.layers[i](hidden)

    def probe(self, i: int, hidden: Tensor, full: bool = False) -> Probe:
        layer = self.vm.encoder.layers[i]
        qkv, _ = layer.self_attn.qkv_proj(layer.layer_norm1(hidden))
        q, k, v = qkv.chunk(3, dim=-1)
        return _attention_probe(q, k, v, layer.self_attn.num_heads_per_partition, full)

    def layer_parts(self, i: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
        layer = self.vm.encoder.layers[i]
        attn_out, _ = layer.self_attn(layer.layer_norm1(hidden))
        x_att = hidden + attn_out
        return x_att, x_att + layer.mlp(layer.layer_norm2(x_att))


class HfClipTower:
    """transformers' ``CLIPVisionTransformer`` up to LLaVA's feature layer."""

    prefix = CLS_TOKENS

    def __init__(self, vision_model, vision_config, feature_layer: int):
        self.vm = vision_model
        self.grid = clip_grid(vision_config)
        total = len(vision_model.encoder.layers)
        # hidden_states[feature_layer] is the output of this many layers.
        self.num_layers = feature_layer if feature_layer >= 0 else total + 1 + feature_layer

    def embed(self, pixel_values: Tensor) -> Tensor:
        return self.vm.pre_layrnorm(self.vm.embeddings(pixel_values))

    def layer(self, i: int, hidden: Tensor) -> Tensor:
        out = self.vm.encoder.layers[i](hidden, None)
        return out[0] if isinstance(out, tuple) else out

    def probe(self, i: int, hidden: Tensor, full: bool = False) -> Probe:
        layer = self.vm.encoder.layers[i]
        x = layer.layer_norm1(hidden)
        attn = layer.self_attn
        return _attention_probe(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x),
                                attn.num_heads, full)

    def layer_parts(self, i: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
        layer = self.vm.encoder.layers[i]
        attn_out = layer.self_attn(hidden_states=layer.layer_norm1(hidden),
                                   attention_mask=None)[0]
        x_att = hidden + attn_out
        return x_att, x_att + layer.mlp(layer.layer_norm2(x_att))


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
def role_markers(tokenizer) -> tuple[str, str]:
    """(user, assistant) role markers as the chat template writes them.

    Rendered from the template with a sentinel message, so a template with other role
    words (or none: ``DEFAULT_ROLES``) is followed rather than assumed.
    """
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
            tokenize=False)
    except Exception:  # no chat template: the llava-hf format
        return DEFAULT_ROLES
    before, _, after = text.partition(_SENTINEL)
    for special in tokenizer.all_special_tokens:
        before = before.replace(special, "")
    user, assistant = before.strip(), after.strip()
    return (user, assistant) if user and assistant else DEFAULT_ROLES


def _id_forms(tokenizer, marker: str) -> list[list[int]]:
    """Token ids ``marker`` can have inside a prompt: alone, after a space, after text
    (sub-word tokenizers write a word differently at the start and mid-sentence)."""
    forms = [tokenizer.encode(marker, add_special_tokens=False),
             tokenizer.encode(" " + marker, add_special_tokens=False)]
    head = tokenizer.encode("a", add_special_tokens=False)
    both = tokenizer.encode("a " + marker, add_special_tokens=False)
    if both[:len(head)] == head:
        forms.append(both[len(head):])
    return [f for i, f in enumerate(forms) if f and f not in forms[:i]]


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
    user_forms, assistant_forms = (_id_forms(tokenizer, m) for m in role_markers(tokenizer))
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
    provides=frozenset({"cls_attention", "keys", "encoder_layers", "text"}),
)
