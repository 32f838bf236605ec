"""Encoder-side pruning of one image, shared by the vLLM model class and the transformers
reference path.

Both adapters wrap their CLIP tower in a :class:`VisionTower` (embeddings, one call per
encoder layer, and a probe that recomputes the CLS attention and keys of a layer, which
vLLM's fused encoder attention does not return) and hand it, with their projector, to
:func:`prune_image`. Everything method-specific lives here and in
:mod:`vllm_vtprune.methods`, so the two serving paths cannot drift apart.

Images are processed one at a time: a batched matmul may round differently from a
single-image one, and a greedy selection can flip on such a difference, which would make
a request's kept set depend on what it was batched with.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import torch
from torch import Tensor

from vllm_vtprune import spec as spec_mod
from vllm_vtprune.methods import divprune, polymorphic, visionzip

# Methods that run on the encoder side (before the LLM); the others prune inside the LLM.
ENCODER_METHODS = ("resprune", "divprune", "visionzip", "polymorphic", "dcp")
# Methods whose kept set depends on the prompt (their cache keys must include it).
TEXT_CONDITIONED = ("resprune", "dcp")


@dataclasses.dataclass
class Probe:
    """Attention of one encoder layer, recomputed from its own projections."""

    cls_attn: Tensor  # [H, N+1]: softmax row of the CLS query (CLS column included)
    keys: Tensor  # [H, N+1, head_dim]
    attn: Tensor | None = None  # [H, N+1, N+1] full softmax attention when asked for


class VisionTower(Protocol):
    num_layers: int

    def embed(self, pixel_values: Tensor) -> Tensor:
        """[1, 3, H, W] -> [1, N+1, C] after the pre-layernorm."""

    def layer(self, i: int, hidden: Tensor) -> Tensor:
        """Encoder layer ``i`` on [1, M, C]."""

    def probe(self, i: int, hidden: Tensor, full: bool = False) -> Probe:
        """Attention that layer ``i`` computes on its input ``hidden`` [1, M, C]."""


Projector = Callable[[Tensor], Tensor]


def is_text_conditioned(spec: spec_mod.PruneSpec | None) -> bool:
    if spec is None or spec.method not in TEXT_CONDITIONED:
        return False
    return not (spec.method == "resprune" and float(spec.option("alpha", 0.75)) == 0.0)


def kept_tokens(spec: spec_mod.PruneSpec | None, num_tokens: int) -> int:
    """Placeholder count of one image: the budget, or every token without pruning."""
    return num_tokens if spec is None else spec.tokens_for(num_tokens)


def check_servable(spec: spec_mod.PruneSpec | None) -> None:
    if spec is not None and spec.method not in ENCODER_METHODS:
        raise ValueError(
            f"vtprune method {spec.method!r} prunes inside the language model, which this "
            f"version does not serve yet; encoder-side methods served: "
            f"{', '.join(ENCODER_METHODS)}")


def run_layers(tower: VisionTower, hidden: Tensor, start: int, stop: int) -> Tensor:
    for i in range(start, stop):
        hidden = tower.layer(i, hidden)
    return hidden


def run_with_last_probe(tower: VisionTower, pixel_values: Tensor) -> tuple[Tensor, Probe]:
    """Feature-layer output [N+1, C] (CLS first) and the probe of that last layer."""
    h = tower.embed(pixel_values)
    last = tower.num_layers - 1
    h = run_layers(tower, h, 0, last)
    probe = tower.probe(last, h)
    h = tower.layer(last, h)
    return h[0], probe


def prune_image(tower: VisionTower, project: Projector, pixel_values: Tensor,
                spec: spec_mod.PruneSpec | None, text: Tensor | None = None) -> Tensor:
    """Visual tokens of one image ([1, 3, H, W]) as the LLM receives them: [K, D]."""
    if spec is None:
        h = run_layers(tower, tower.embed(pixel_values), 0, tower.num_layers)
        return project(h[0, 1:])
    check_servable(spec)
    if spec.method == "dcp":
        return _dcp(tower, project, pixel_values, spec, text)
    hidden, probe = run_with_last_probe(tower, pixel_values)
    num_patches = hidden.shape[0] - 1
    k = spec.tokens_for(num_patches)
    if k >= num_patches:
        return project(hidden[1:])
    return _ENCODER_OUTPUT_METHODS[spec.method](hidden, probe, project, spec, k, text)


def _resprune(hidden, probe, project, spec, k, text):
    """ResPrune on projector outputs, seeded by the highest CLS attention (Sec. IV-A1)."""
    from vllm_vtprune.kernels import resprune_select

    tokens = project(hidden[1:])
    seed = int(torch.argmax(probe.cls_attn.float().sum(0)[1:]))
    alpha = float(spec.option("alpha", 0.75))
    if spec.option("seed", "cls") == "norm":
        seed = None
    idx = resprune_select(tokens, k, text=text, alpha=alpha, seed=seed)
    return tokens[idx]


def _divprune(hidden, probe, project, spec, k, text):
    tokens = project(hidden[1:])
    return tokens[divprune.select(tokens, k)]


def _visionzip(hidden, probe, project, spec, k, text):
    contextual = spec.option("contextual", None)
    tokens, _ = visionzip.select(hidden, probe.cls_attn, probe.keys.float().mean(0), k,
                                 keep_cls=False,
                                 contextual=int(contextual) if contextual is not None else None)
    return project(tokens.to(hidden.dtype))


def _polymorphic(hidden, probe, project, spec, k, text):
    knn = spec.option("knn", None)
    kwargs = {} if knn is None else {"knn": int(knn)}
    tokens, _, _ = polymorphic.stage1(hidden[1:], probe.cls_attn.float().sum(0)[1:], k, **kwargs)
    return project(tokens.to(hidden.dtype))


_ENCODER_OUTPUT_METHODS = {
    "resprune": _resprune,
    "divprune": _divprune,
    "visionzip": _visionzip,
    "polymorphic": _polymorphic,
}


def _dcp(tower, project, pixel_values, spec, text):
    from vllm_vtprune.methods import dcp

    return project(dcp.run_in_tower(tower, pixel_values, spec, text, project).to(
        pixel_values.dtype if pixel_values.is_floating_point() else torch.float32))
