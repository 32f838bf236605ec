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
