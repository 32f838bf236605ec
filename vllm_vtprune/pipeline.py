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
    values: Tensor | None = None  # [H, N+1, head_dim] when asked for


class VisionTower(Protocol):
    num_layers: int

    def embed(self, pixel_values: Tensor) -> Tensor:
        """[1, 3, H, W] -> [1, N+1, C] after the pre-layernorm."""

    def layer(self, i: int, hidden: Tensor) -> Tensor:
        """Encoder layer ``i`` on [1, M, C]."""

    def probe(self, i: int, hidden: Tensor, full: bool = False) -> Probe:
        """Attention that layer ``i`` computes on its input ``hidden`` [1, M, C]."""

    def layer_parts(self, i: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``i``'s residual stream after its attention and after its FFN branch."""


Projector = Callable[[Tensor], Tensor]


@dataclasses.dataclass
class PrunedImage:
    tokens: Tensor  # [K, D] what the LLM receives, in order
    kept: Tensor | None  # patch indices the tokens come from (None: not a plain subset)


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
                spec: spec_mod.PruneSpec | None, text: Tensor | None = None) -> PrunedImage:
    """Visual tokens of one image ([1, 3, H, W]) as the LLM receives them: [K, D]."""
    if spec is None:
        return _unpruned(project, run_layers(tower, tower.embed(pixel_values), 0,
                                             tower.num_layers)[0])
    check_servable(spec)
    if spec.method == "dcp":
        return _dcp(tower, project, pixel_values, spec, text)
    hidden, probe = run_with_last_probe(tower, pixel_values)
    num_patches = hidden.shape[0] - 1
    k = spec.tokens_for(num_patches)
    if k >= num_patches:
        return _unpruned(project, hidden)
    return _ENCODER_OUTPUT_METHODS[spec.method](hidden, probe, project, spec, k, text)


def _unpruned(project: Projector, hidden: Tensor) -> PrunedImage:
    return PrunedImage(project(hidden[1:]), torch.arange(hidden.shape[0] - 1))


def _resprune(hidden, probe, project, spec, k, text):
    """ResPrune on projector outputs, seeded by the highest CLS attention (Sec. IV-A1)."""
    from vllm_vtprune.kernels import resprune_select

    tokens = project(hidden[1:])
    seed = int(torch.argmax(probe.cls_attn.float().sum(0)[1:]))
    alpha = float(spec.option("alpha", 0.75))
    if spec.option("seed", "cls") == "norm":
        seed = None
    idx = resprune_select(tokens, k, text=text, alpha=alpha, seed=seed)
    return PrunedImage(tokens[idx], idx)


def _divprune(hidden, probe, project, spec, k, text):
    tokens = project(hidden[1:])
    idx = divprune.select(tokens, k)
    return PrunedImage(tokens[idx], idx)


def _visionzip(hidden, probe, project, spec, k, text):
    contextual = spec.option("contextual", None)
    tokens, _ = visionzip.select(hidden, probe.cls_attn, probe.keys.float().mean(0), k,
                                 keep_cls=False,
                                 contextual=int(contextual) if contextual is not None else None)
    return PrunedImage(project(tokens.to(hidden.dtype)), None)


def _polymorphic(hidden, probe, project, spec, k, text):
    knn = spec.option("knn", None)
    kwargs = {} if knn is None else {"knn": int(knn)}
    tokens, _, _ = polymorphic.stage1(hidden[1:], probe.cls_attn.float().sum(0)[1:], k, **kwargs)
    return PrunedImage(project(tokens.to(hidden.dtype)), None)


_ENCODER_OUTPUT_METHODS = {
    "resprune": _resprune,
    "divprune": _divprune,
    "visionzip": _visionzip,
    "polymorphic": _polymorphic,
}


def _dcp(tower, project, pixel_values, spec, text):
    """DCP-Prune inside the tower: an ACGR stage after every second layer, shrinking
    uniformly to the budget (Sec. 3.2), the last one switching to TATCS when
    kappa > delta (Sec. 3.3); TATCS compares projector outputs with the noun embeddings."""
    from vllm_vtprune.methods import dcp

    h = tower.embed(pixel_values)
    n = h.shape[1] - 1
    k = spec.tokens_for(n)
    if k >= n:
        return _unpruned(project, run_layers(tower, h, 0, tower.num_layers)[0])
    targets = dcp.schedule(n, k, tower.num_layers, every=2)
    positions = dcp.grid_positions(n)
    origin = torch.arange(n)
    graph = dict(k_n=int(spec.option("kn", dcp.K_N)), tau=float(spec.option("tau", dcp.TAU)))
    for i in range(tower.num_layers):
        stage = (i + 1) // 2 - 1
        if (i + 1) % 2 or stage >= len(targets):
            h = tower.layer(i, h)
            continue
        probe = tower.probe(i, h, full=True)
        x_att, x_out = tower.layer_parts(i, h)
        scores = dict(cls_attn=probe.cls_attn[:, 1:], x_in=h[0, 1:], x_att=x_att[0, 1:],
                      x_ffn=x_out[0, 1:], attn=probe.attn[:, 1:, 1:],
                      values=probe.values[:, 1:])
        y = x_out[0, 1:]
        if stage == len(targets) - 1:
            kept, new, _ = dcp.final_stage(
                y, targets[stage], positions, text, **scores, **graph,
                delta=float(spec.option("delta", dcp.DELTA)),
                text_space_tokens=project(y) if text is not None else None)
        else:
            kept, new = dcp.acgr_stage(y, targets[stage], positions, **scores, **graph)
        positions, origin = positions[kept.cpu()], origin[kept.cpu()]
        h = torch.cat([x_out[:, :1], new[None].to(h.dtype)], dim=1)
    return PrunedImage(project(h[0, 1:]), origin)


def prompt_noun_ids(tokenizer, prompt_ids: list[int], exclude: set[int],
                    limit: int = 32) -> list[int]:
    """LLM-vocabulary ids of the prompt's nouns (ResPrune Eq. 13's text tokens).

    The prompt is decoded without special tokens; its last user turn (LLaVA's
    ``USER: ... ASSISTANT:`` format), without answer-format instructions, gives the nouns;
    every sub-word id of every noun is kept (a multi-token noun contributes
    all of its pieces), first ``limit`` ids.
    """
    from vllm_vtprune import text as text_mod

    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    # The question being answered is the last user turn; earlier turns would crowd it out.
    prompt = prompt.rsplit("USER:", 1)[-1].split("ASSISTANT:", 1)[0]
    prompt = prompt.replace("SYSTEM:", " ")
    nouns = text_mod.extract_nouns(text_mod.clean_prompt(prompt))
    if not nouns:
        return []
    ids = tokenizer.encode(" ".join(nouns), add_special_tokens=False)
    return [i for i in ids if i not in exclude][:limit]


def trace(spec: spec_mod.PruneSpec | None, text_ids: list[int], image: PrunedImage) -> None:
    """Append the kept set to ``$VTPRUNE_TRACE`` (JSON lines) when that variable is set.

    Lets tests and operators see which tokens a served request kept, and whether the
    encoder cache was hit (a hit computes nothing, so writes nothing).
    """
    import json
    import os

    path = os.environ.get("VTPRUNE_TRACE")
    if not path:
        return
    kept = image.kept.tolist() if image.kept is not None else None
    with open(path, "a") as f:
        f.write(json.dumps({"spec": str(spec) if spec else "none", "text_ids": text_ids,
                            "num_tokens": int(image.tokens.shape[0]), "kept": kept}) + "\n")
