""":class:`vllm_vtprune.pipeline.VisionTower` adapters for vLLM's and transformers' CLIP."""
from __future__ import annotations

import torch
from torch import Tensor

from vllm_vtprune.pipeline import Probe


def _attention_probe(q: Tensor, k: Tensor, num_heads: int, full: bool) -> Probe:
    """Softmax(q k^T / sqrt(d)) of the CLS query (and of all queries when ``full``).

    q, k: [1, M, H*d] projections of the layer's normalised input.
    """
    m = q.shape[1]
    d = q.shape[-1] // num_heads
    qh = q[0].float().view(m, num_heads, d).transpose(0, 1)
    kh = k[0].float().view(m, num_heads, d).transpose(0, 1)
    rows = qh if full else qh[:, :1]
    attn = torch.softmax(rows @ kh.transpose(1, 2) * d ** -0.5, dim=-1)
    return Probe(cls_attn=attn[:, 0], keys=kh, attn=attn if full else None)


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
        q, k, _ = qkv.chunk(3, dim=-1)
        return _attention_probe(q, k, layer.self_attn.num_heads_per_partition, full)


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
        return _attention_probe(layer.self_attn.q_proj(x), layer.self_attn.k_proj(x),
                                layer.self_attn.num_heads, full)
