"""Qwen2-VL and Qwen2.5-VL with visual-token pruning, as vLLM model classes.

``--vtprune resprune:0.25`` on a ``qwen2_vl`` / ``qwen2_5_vl`` checkpoint selects them.
Each image runs through vLLM's own vision encoder on its own; a method keeps K of its
merged tokens (:mod:`vllm_vtprune.families.qwen2_vl`); the kept tokens keep their
unpruned M-RoPE positions through vLLM's multimodal-pruning hook
(:mod:`vllm_vtprune.models.mrope`). The processor and the per-request plumbing are
:mod:`vllm_vtprune.models.pruning`'s. Images only: a pruning server takes no videos
(vLLM answers a request with one as for a model without video input).
"""
from __future__ import annotations

import torch
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_vtprune import pipeline
from vllm_vtprune.families import qwen2_5_vl as family_25
from vllm_vtprune.families import qwen2_vl as family
from vllm_vtprune.models import mrope
from vllm_vtprune.models.pruning import PruningInfo, PruningModel, PruningProcessor

_HOOKED = False


def install_runner_hook() -> None:
    """Turn on vLLM's multimodal-pruning step for a model of ours: the runner then hands
    each step's image embeddings to ``recompute_mrope_positions`` before the forward.
    vLLM sets that flag only for video pruning rates, and its CPU runner never does; the
    hook sits on ``_gather_mm_embeddings``, which every runner inherits."""
    global _HOOKED
    if _HOOKED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._gather_mm_embeddings

    def _gather_mm_embeddings(self, *args, **kwargs):
        if getattr(self.get_model(), "vtprune_mrope_channels", 0) and self.uses_mrope:
            self.is_multimodal_pruning_enabled = True
        return original(self, *args, **kwargs)

    GPUModelRunner._gather_mm_embeddings = _gather_mm_embeddings
    _HOOKED = True


class _QwenInfo(PruningInfo):
    def get_supported_mm_limits(self):
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int, spec=None,
                             image_processor=None, mm_kwargs=None) -> int:
        full = super(PruningInfo, self).get_num_image_tokens(
            image_width=image_width, image_height=image_height,
            image_processor=image_processor or self.get_image_processor(),
            mm_kwargs=mm_kwargs or {})
        return pipeline.kept_tokens(spec, full)


class VTPruneQwen2VLProcessingInfo(_QwenInfo, Qwen2VLProcessingInfo):
    family = family


class VTPruneQwen2VLMultiModalProcessor(PruningProcessor, Qwen2VLMultiModalProcessor):
    pass


class _QwenPruning(PruningModel):
    """What both Qwen classes add to vLLM's: per-image pruning at the encoder output,
    kept tokens tagged with their grid places, positions recomputed from them."""

    vtprune_mrope_channels = mrope.CHANNELS

    def _init_pruning(self, vllm_config, build) -> None:
        install_runner_hook()
        self._build(vllm_config, build)

    def _setup_tower(self, run) -> None:
        self._tower = family.EncoderTower(self.visual, self.config.vision_config, run)

    def _merged_grid(self, grid_thw) -> tuple[int, int, int]:
        t, h, w = (int(v) for v in grid_thw)
        merge = self.config.vision_config.spatial_merge_size
        return t, h // merge, w // merge

    def _prune_one(self, image_input, index: int, spec, text) -> pipeline.PrunedImage:
        grids = image_input["image_grid_thw"]
        sizes = grids.prod(-1).tolist()
        start = sum(sizes[:index])
        patches = image_input["pixel_values"][start:start + sizes[index]]
        tower = self._tower.for_image(grids[index].tolist())
        image = pipeline.prune_image(tower, tower.project, patches, spec, text)
        image.grid_thw = self._merged_grid(grids[index])
        return image

    def _tokens(self, image: pipeline.PrunedImage, spec) -> torch.Tensor:
        places = mrope.encode(image.origins, image.grid_thw).to(image.tokens)
        out = torch.cat([image.tokens, places], dim=1)
        if self._in_llm:  # tagged whole: the places are cut off as a view of the same storage
            from vllm_vtprune.models import in_llm

            return in_llm.tag(out, spec, image.num_patches)
        return out

    def get_mrope_input_positions(self, input_tokens, mm_features):
        images = [(f.mm_position.offset, f.mm_position.length,
                   self._merged_grid(f.data["image_grid_thw"].data.tolist()))
                  for f in sorted(mm_features, key=lambda f: f.mm_position.offset)]
        return mrope.input_positions(len(input_tokens), images)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions,
                                  num_computed_tokens):
        return mrope.recompute(input_ids, multimodal_embeddings, mrope_positions,
                               num_computed_tokens, self.config.image_token_id)


@MULTIMODAL_REGISTRY.register_processor(VTPruneQwen2VLMultiModalProcessor,
                                        info=VTPruneQwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
# SupportsMultiModalPruning is a Protocol: before vLLM's class, its __init__ would stand
# in for the model's in the MRO.
class VTPruneQwen2VLForConditionalGeneration(_QwenPruning, Qwen2VLForConditionalGeneration,
                                             SupportsMultiModalPruning):
    """Stock vLLM Qwen2-VL whose images are pruned at the encoder output."""

    family = family

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        self._init_pruning(vllm_config, lambda: super(_QwenPruning, self).__init__(
            vllm_config=vllm_config, prefix=prefix))
        self._setup_tower(family.vllm_run)


class VTPruneQwen2_5_VLProcessingInfo(_QwenInfo, Qwen2_5_VLProcessingInfo):
    family = family_25


class VTPruneQwen2_5_VLMultiModalProcessor(PruningProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VTPruneQwen2_5_VLMultiModalProcessor,
                                        info=VTPruneQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VTPruneQwen2_5_VLForConditionalGeneration(_QwenPruning, Qwen2_5_VLForConditionalGeneration):
    """Stock vLLM Qwen2.5-VL (window attention in its tower) pruned at the encoder output."""

    family = family_25

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        self._init_pruning(vllm_config, lambda: super(_QwenPruning, self).__init__(
            vllm_config=vllm_config, prefix=prefix))
        self._setup_tower(family.vllm_run)
