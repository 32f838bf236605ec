"""Startup checks shared by the vLLM model class and the ``--vtprune`` flag (no vLLM import)."""
from __future__ import annotations

from vllm_vtprune import pipeline
from vllm_vtprune import spec as spec_mod

SPEC_KEY = "vtprune"  # hf_config attribute and per-request mm_processor_kwargs key


def server_spec(hf_config) -> spec_mod.PruneSpec | None:
    return spec_mod.parse(getattr(hf_config, SPEC_KEY, None))


def check_supported(hf_config) -> None:
    """Fail at startup on models this class cannot prune correctly."""
    vision = getattr(hf_config, "vision_config", None)
    if getattr(hf_config, "model_type", None) != "llava" or getattr(
            vision, "model_type", None) != "clip_vision_model":
        raise ValueError(
            f"vtprune: model type {getattr(hf_config, 'model_type', None)!r} with vision "
            f"tower {getattr(vision, 'model_type', None)!r} is not supported; supported: "
            "LLaVA-1.5 (model_type 'llava' with a CLIP vision tower)")
    if hf_config.vision_feature_select_strategy != "default":
        raise ValueError("vtprune: LLaVA with vision_feature_select_strategy "
                         f"{hf_config.vision_feature_select_strategy!r} is not supported; "
                         "supported: 'default'")
    pipeline.check_servable(server_spec(hf_config))


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
