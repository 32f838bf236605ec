"""Model families: everything specific to one kind of served model, one module each.

A family module defines ``FAMILY`` (a :class:`Family`): which served configs it matches,
the vLLM architecture name of its pruning class, its patch grid and the tokens a method
chooses among per image, its vision-tower adapters (:class:`vllm_vtprune.pipeline.VisionTower`) and
how the question of a prompt is found. The pipeline and the methods assume none of it.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

__all__ = ["Family", "families", "for_config", "for_architecture", "served_methods", "table"]

_MODULES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # what users call it, e.g. "LLaVA-1.5"
    description: str  # what it matches, for error messages
    architecture: str  # vLLM architecture name of the pruning class
    vllm_class: str  # "module:Class" of that class (imports vLLM; loaded lazily)
    matches: Callable[[object], bool]  # hf_config -> whether this family serves it
    check: Callable[[object], None]  # hf_config -> raises on unsupported variants
    grid: Callable[[object], tuple[int, int]]  # hf_config -> patch (rows, cols) per image
    question_ids: Callable[[object, list[int]], list[int]]  # (tokenizer, prompt ids)
    #: What its towers give the methods (see ``registry.Method.needs``).
    provides: frozenset[str] = frozenset()
    #: How an image becomes tokens, and what a budget counts (the README's table)
    images: str = ""
    #: Option defaults of methods on this family, where a paper sets them per model
    #: (method -> option -> value); a spec that gives the option keeps its own
    defaults: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    #: "module:Class" of its transformers reference path (vllm_vtprune.hf)
    reference: str = "vllm_vtprune.hf:HfReference"
    #: (hf_config, width, height) -> tokens a method chooses among, when an image's
    #: placeholders hold more than its patches (LLaVA-NeXT's newlines); None: all of them
    prunable_tokens: Callable[[object, int, int], int] | None = None


def with_defaults(spec, family: Family):
    """``spec`` with the family's defaults for its method's options it does not give."""
    if spec is None:
        return spec
    given = dict(spec.options)
    for name, value in dict(family.defaults).get(spec.method, ()):
        if name not in given:
            spec = spec.with_option(name, value)
    return spec


def families() -> tuple[Family, ...]:
    return tuple(importlib.import_module(f"{__name__}.{m}").FAMILY for m in _MODULES)


def supported() -> str:
    return "; ".join(f"{f.name} ({f.description})" for f in families())


def for_config(hf_config) -> Family:
    """The family serving ``hf_config``; a clear error naming the supported ones if none."""
    for family in families():
        if family.matches(hf_config):
            family.check(hf_config)
            return family
    vision = getattr(hf_config, "vision_config", None)
    raise ValueError(
        f"vtprune: model type {getattr(hf_config, 'model_type', None)!r} with vision tower "
        f"{getattr(vision, 'model_type', None)!r} is not supported; supported: {supported()}")


def for_architecture(architecture: str) -> Family | None:
    return next((f for f in families() if f.architecture == architecture), None)


#: an image's token count on a family whose images differ in size (LLaVA-NeXT, Qwen2-VL):
#: checks of an in-LLM spec only try its layers and checkpoint on it, and the plans
#: served there get each image's own count
NOMINAL_IMAGE_TOKENS = 1024


def fixed_image_tokens(family: Family, hf_config) -> int | None:
    """Every image's unpruned token count on ``family``'s model where all images have the
    same (LLaVA-1.5's grid); None where it depends on the image."""
    if family.prunable_tokens is not None:  # LLaVA-NeXT: the image's size decides
        return None
    try:
        rows, cols = family.grid(hf_config)
    except ValueError:  # no fixed grid (Qwen2-VL)
        return None
    return rows * cols


def image_tokens(family: Family, hf_config) -> int:
    """:func:`fixed_image_tokens`, else :data:`NOMINAL_IMAGE_TOKENS`."""
    fixed = fixed_image_tokens(family, hf_config)
    return NOMINAL_IMAGE_TOKENS if fixed is None else fixed


def served_methods(family: Family) -> list[str]:
    """Methods a server of this family accepts (in-LLM ones need a server started with one)."""
    from vllm_vtprune import registry

    return [m for m in registry.served() if registry.get(m).needs_for({}) <= family.provides]


def table() -> str:
    """The README's supported-models table (``vtprune models``), from the adapters."""
    rows = ["| family | served when the config is | an image's tokens | methods |",
            "|---|---|---|---|"]
    for f in families():
        rows.append(f"| {f.name} | {f.description} | {f.images} | "
                    f"{', '.join(served_methods(f))} |")
    return "\n".join(rows)
