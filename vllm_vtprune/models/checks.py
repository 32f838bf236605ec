"""Startup checks shared by the vLLM model class and the ``--vtprune`` flag (no vLLM import)."""
from __future__ import annotations

from vllm_vtprune import families, pipeline
from vllm_vtprune import spec as spec_mod

SPEC_KEY = "vtprune"  # hf_config attribute and per-request mm_processor_kwargs key


def server_spec(hf_config) -> spec_mod.PruneSpec | None:
    return resolved_spec(spec_mod.parse(getattr(hf_config, SPEC_KEY, None)), hf_config)


def resolved_spec(spec: spec_mod.PruneSpec | None, hf_config) -> spec_mod.PruneSpec | None:
    """``spec`` as served on this model: the embedded model's shipped RCP modules, the
    family's option defaults (ResPrune's alpha on Qwen) where the spec gives none."""
    from vllm_vtprune.embedded import with_shipped_modules

    spec = with_shipped_modules(spec, hf_config)
    try:
        family = families.for_config(hf_config)
    except ValueError:  # refused elsewhere, with the supported families
        return spec
    return families.with_defaults(spec, family)


def check_supported(hf_config) -> families.Family:
    """The served model's family; fails at startup on models no family prunes correctly,
    and on a server spec this version does not serve."""
    family = families.for_config(hf_config)
    pipeline.check_servable(server_spec(hf_config), family, server=True)
    return family


def check_parallelism(vllm_config, spec: spec_mod.PruneSpec | None = None) -> None:
    """Refuse set-ups whose pruning would see part of the model.

    Tensor parallelism is served (:mod:`vllm_vtprune.models.parallel`: probes and
    decoder attention completed over every rank's heads, rank 0's decisions applied on
    every rank). Tower LoRA would be told K tokens where CLIP processes all of them.
    """
    lora = getattr(vllm_config, "lora_config", None)
    if lora is not None and getattr(lora, "enable_tower_connector_lora", False):
        raise ValueError("vtprune: tower/connector LoRA is not supported; supported: "
                         "LoRA on the language model only")
