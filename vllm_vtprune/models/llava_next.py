"""LLaVA-NeXT with visual-token pruning, as a vLLM model class.

``--vtprune resprune:0.25`` on a ``llava_next`` checkpoint selects it. Each image's base
and anyres tiles run through the tower one at a time and are pruned together under one
per-image budget, newlines dropped (:mod:`vllm_vtprune.families.llava_next` says why);
the processor and the per-request plumbing are :mod:`vllm_vtprune.models.pruning`'s.
"""
from __future__ import annotations

from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_vtprune import pipeline
from vllm_vtprune.families import llava_next as family
from vllm_vtprune.models import parallel
from vllm_vtprune.models.pruning import PruningInfo, PruningModel, PruningProcessor


class VTPruneLlavaNextProcessingInfo(PruningInfo, LlavaNextProcessingInfo):
    family = family


class VTPruneLlavaNextMultiModalProcessor(PruningProcessor, LlavaNextMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VTPruneLlavaNextMultiModalProcessor,
                                        info=VTPruneLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VTPruneLlavaNextForConditionalGeneration(PruningModel, LlavaNextForConditionalGeneration):
    """Stock vLLM LLaVA-NeXT whose images are pruned across their tiles."""

    family = family

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        self._build(vllm_config, lambda: super(PruningModel, self).__init__(
            vllm_config=vllm_config, prefix=prefix))
        self._tower = family.VllmClipTower(self.vision_tower.vision_model,
                                           vllm_config.model_config.hf_config.vision_config,
                                           parallel.all_heads, parallel.agree)

    def _prune_one(self, image_input, index: int, spec, text) -> pipeline.PrunedImage:
        size = image_input["image_sizes"][index]
        layout = family.layout_of(self.config, (int(size[0]), int(size[1])))
        tiles = image_input["pixel_values"][index][:layout.num_tiles]
        return pipeline.prune_tiled(self._tower, self.multi_modal_projector, tiles, layout,
                                    spec, text, self.image_newline)
