"""Startup checks shared by the vLLM model class and the ``--vtprune`` flag (no vLLM import)."""
from __future__ import annotations

from vllm_vtprune import families, pipeline, registry
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


def check_parallelism(vllm_config, spec: spec_mod.PruneSpec | None = None) -> None:
    """Refuse set-ups whose pruning could differ between ranks or see part of the model.

    Encoder-side pruning runs under tensor parallelism: the probes are completed over
    every rank's heads and the tokens broadcast from rank 0
    (:mod:`vllm_vtprune.models.parallel`). Pruning inside the LLM reads each decoder
    layer's attention, which a rank holds for its own heads only: refused there until its
    scores are combined across ranks. Tower LoRA would be told K tokens where CLIP
    processes all of them.
    """
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp > 1 and pipeline.acts_in_llm(spec):
        raise ValueError(f"vtprune: {spec.method} prunes inside the LLM, which is not "
                         f"supported with tensor_parallel_size={tp} yet; supported there: "
                         "methods that prune at the encoder ("
                         + ", ".join(m for m in registry.served() if m not in registry.in_llm())
                         + ")")
    lora = getattr(vllm_config, "lora_config", None)
    if lora is not None and getattr(lora, "enable_tower_connector_lora", False):
        raise ValueError("vtprune: tower/connector LoRA is not supported; supported: "
                         "LoRA on the language model only")
