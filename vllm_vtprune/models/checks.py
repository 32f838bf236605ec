"""Startup checks shared by the vLLM model class and the ``--vtprune`` flag (no vLLM import)."""
from __future__ import annotations

from vllm_vtprune import families, pipeline
from vllm_vtprune import spec as spec_mod

SPEC_KEY = "vtprune"  # hf_config attribute and per-request mm_processor_kwargs key


def server_spec(hf_config) -> spec_mod.PruneSpec | None:
    from vllm_vtprune.embedded import with_shipped_modules

    return with_shipped_modules(spec_mod.parse(getattr(hf_config, SPEC_KEY, None)), hf_config)


def check_supported(hf_config) -> families.Family:
    """The served model's family; fails at startup on models no family prunes correctly,
    and on a server spec this version does not serve."""
    family = families.for_config(hf_config)
    pipeline.check_servable(server_spec(hf_config), family, server=True)
    return family


def check_parallelism(vllm_config) -> None:
    """Refuse set-ups whose encoder sees only part of the computation.

    With tensor parallelism each rank's CLIP attention holds a slice of the heads, so
    the recomputed CLS attention (and every kept set that depends on it) would differ
    between ranks; tower LoRA would be told K tokens where CLIP processes all of them.
    """
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp > 1:
        raise ValueError(f"vtprune: tensor_parallel_size={tp} is not supported yet; "
                         "supported: 1 (pipeline or data parallelism instead)")
    lora = getattr(vllm_config, "lora_config", None)
    if lora is not None and getattr(lora, "enable_tower_connector_lora", False):
        raise ValueError("vtprune: tower/connector LoRA is not supported; supported: "
                         "LoRA on the language model only")
