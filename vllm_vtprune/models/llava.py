"""LLaVA-1.5 with visual-token pruning, as a vLLM model class.

Selected with ``--hf-overrides '{"architectures": ["VTPruneLlavaForConditionalGeneration"],
"vtprune": "resprune:128"}'`` (what ``--vtprune resprune:128`` expands to). A request may
override the server's spec with ``mm_processor_kwargs={"vtprune": "resprune:64"}``.
The processor and the per-image pruning are :mod:`vllm_vtprune.models.pruning`'s; this
file adds LLaVA-1.5's own: one tower pass per image.
"""
from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_vtprune import pipeline
from vllm_vtprune.families import llava as family
from vllm_vtprune.models import parallel
from vllm_vtprune.models.pruning import PruningInfo, PruningModel, PruningProcessor


class VTPruneLlavaProcessingInfo(PruningInfo, LlavaProcessingInfo):
    family = family


class VTPruneLlavaMultiModalProcessor(PruningProcessor, LlavaMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VTPruneLlavaMultiModalProcessor,
                                        info=VTPruneLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VTPruneLlavaForConditionalGeneration(PruningModel, LlavaForConditionalGeneration):
    """Stock vLLM LLaVA whose image embeddings are pruned per :mod:`vllm_vtprune.pipeline`."""

    family = family

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        self._build(vllm_config, lambda: super(PruningModel, self).__init__(
            vllm_config=vllm_config, prefix=prefix))
        self._tower = family.VllmClipTower(self.vision_tower.vision_model,
                                           vllm_config.model_config.hf_config.vision_config,
                                           parallel.all_heads, parallel.agree)

    def _prune_one(self, image_input, index: int, spec, text) -> pipeline.PrunedImage:
        pixels = image_input["pixel_values"]
        return pipeline.prune_image(self._tower, self.multi_modal_projector,
                                    pixels[index:index + 1], spec, text)
