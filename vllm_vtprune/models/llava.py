"""LLaVA-1.5 with visual-token pruning, as a vLLM model class.

Selected with ``--hf-overrides '{"architectures": ["VTPruneLlavaForConditionalGeneration"],
"vtprune": "resprune:128"}'`` (what ``--vtprune resprune:128`` expands to). A request may
override the server's spec with ``mm_processor_kwargs={"vtprune": "resprune:64"}``.
The processor and the per-image pruning are :mod:`vllm_vtprune.models.pruning`'s; this
file adds what only LLaVA-1.5 serves: one tower pass per image, and methods inside the
LLM (the masked decoder).
"""
from __future__ import annotations

import contextlib

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
from vllm_vtprune.models.checks import check_parallelism, server_spec
from vllm_vtprune.models.pruning import PruningInfo, PruningModel, PruningProcessor

#: hf_overrides key: "skip" (default) takes pruned rows out of the decoder's batch, "mask"
#: only hides them (the latency bench's comparison arm)
ROWS_KEY = "vtprune_rows"


class VTPruneLlavaProcessingInfo(PruningInfo, LlavaProcessingInfo):
    family = family


class VTPruneLlavaMultiModalProcessor(PruningProcessor, LlavaMultiModalProcessor):
    pass


def _check_in_llm_serving(vllm_config, spec) -> None:
    """Refuse the settings under which a decision inside the LLM cannot be taken, and a
    spec that does not fit this decoder (a layer beyond its depth, a foreign checkpoint)."""
    from vllm.config import CompilationMode

    if vllm_config.scheduler_config.enable_chunked_prefill:
        raise ValueError(f"vtprune {spec}: chunked prefill could split an image from its "
                         "question; accepted: --no-enable-chunked-prefill")
    if str(vllm_config.cache_config.cache_dtype or "auto") != "auto":
        raise ValueError(f"vtprune {spec}: the masked attention stores K/V unquantised; "
                         f"accepted: --kv-cache-dtype auto (got "
                         f"{vllm_config.cache_config.cache_dtype})")
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(f"vtprune {spec}: the prefix cache would share pruned KV between "
                         "prompts; accepted: --no-enable-prefix-caching")
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        raise ValueError(f"vtprune {spec}: the decoder's per-request decisions run in "
                         "Python between layers, which a compiled graph would freeze; "
                         "accepted: --enforce-eager")
    hf = vllm_config.model_config.hf_config
    rows, cols = family.grid(hf)
    pipeline.check_fits_decoder(spec, hf.text_config.num_hidden_layers,
                                hf.text_config.hidden_size, rows * cols)


@contextlib.contextmanager
def _masked_attention(vllm_config, spec):
    """While the model is built, its decoder layers get the masked attention backend
    (``spec`` prunes inside the LLM); other models built later in this process keep
    vLLM's own."""
    from vllm.v1.attention.backends import registry as backends
    from vllm.v1.attention.selector import _cached_get_attn_backend

    from vllm_vtprune.models import in_llm, masked_attention

    _check_in_llm_serving(vllm_config, spec)
    hf = vllm_config.model_config.hf_config
    rows, cols = family.grid(hf)
    in_llm.STEP.configure(hf.text_config.num_hidden_layers, rows * cols,
                          vllm_config.cache_config.block_size,
                          skip_rows=getattr(hf, ROWS_KEY, "skip") != "mask")
    enum = backends.AttentionBackendEnum.CPU_ATTN
    previous = backends._ATTN_OVERRIDES.get(enum)
    backends.register_backend(enum, f"{masked_attention.__name__}.VTPruneCPUAttentionBackend")
    _cached_get_attn_backend.cache_clear()  # an earlier engine in this process chose one
    try:
        yield
    finally:
        if previous is None:
            backends._ATTN_OVERRIDES.pop(enum, None)
        else:
            backends._ATTN_OVERRIDES[enum] = previous
        _cached_get_attn_backend.cache_clear()


@MULTIMODAL_REGISTRY.register_processor(VTPruneLlavaMultiModalProcessor,
                                        info=VTPruneLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VTPruneLlavaForConditionalGeneration(PruningModel, LlavaForConditionalGeneration):
    """Stock vLLM LLaVA whose image embeddings are pruned per :mod:`vllm_vtprune.pipeline`."""

    family = family

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        self._check_family(vllm_config)
        spec = server_spec(vllm_config.model_config.hf_config)
        check_parallelism(vllm_config, spec)
        if pipeline.acts_in_llm(spec):
            with _masked_attention(vllm_config, spec):
                super().__init__(vllm_config=vllm_config, prefix=prefix)
        else:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._in_llm = pipeline.acts_in_llm(spec)
        if self._in_llm:
            import types

            from vllm_vtprune.models import in_llm

            decoder = self.language_model.model
            decoder.forward = types.MethodType(in_llm.decoder_forward, decoder)
        self._tower = family.VllmClipTower(self.vision_tower.vision_model,
                                           vllm_config.model_config.hf_config.vision_config,
                                           parallel.all_heads, parallel.agree)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None,
                        **kwargs):
        if self._in_llm:  # which rows of this step are image tokens, under which spec
            from vllm_vtprune.models import in_llm

            in_llm.record_images(is_multimodal, multimodal_embeddings)
        return super().embed_input_ids(input_ids, multimodal_embeddings,
                                       is_multimodal=is_multimodal, **kwargs)

    def _prune_one(self, image_input, index: int, spec, text) -> pipeline.PrunedImage:
        pixels = image_input["pixel_values"]
        return pipeline.prune_image(self._tower, self.multi_modal_projector,
                                    pixels[index:index + 1], spec, text)
