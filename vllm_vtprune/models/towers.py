""":class:`vllm_vtprune.pipeline.VisionTower` adapters for vLLM's and transformers' CLIP."""
from __future__ import annotations

import torch
from torch import Tensor

from vllm_vtprune.pipeline import Probe


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


class VllmClipTower:
    """vLLM's ``CLIPVisionTransformer`` (truncated at the feature layer) one layer at a time."""

    def __init__(self, vision_model):
        self.vm = vision_model
        self.num_layers = len(vision_model.encoder.layers)

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

    def __init__(self, vision_model, feature_layer: int):
        self.vm = vision_model
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
