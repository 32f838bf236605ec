"""What every family's vLLM pruning class shares: the processing-info, processor and
model mixins that put a spec and a prompt's nouns into each image's multimodal hash,
size its placeholders, and prune each image inside the model.

A family's model file (:mod:`vllm_vtprune.models.llava`, ``llava_next``) puts these
mixins before vLLM's own classes for that family and says, in its model class, how one
image of a batch is pruned (``_prune_one``). How the pieces fit (checked against vLLM
0.32's ``multimodal/processing`` source):

* The processor decides the placeholder count: each image is expanded to the number of
  tokens the spec keeps, and carries two small per-image fields to the model: the spec
  string (as bytes) and, for text-conditioned methods, the token ids of the prompt's
  nouns.
* Those per-image values are put into the request's ``mm_processor_kwargs`` before vLLM
  hashes the image, so the multimodal hash, which keys the processor cache, the encoder
  cache and the prefix cache, changes with the spec and with the prompt's nouns: one
  question's pruning is never reused for another.
* The model embeds the nouns with the LLM's own embedding table and prunes each image
  on its own, returning exactly that many embeddings in their original order.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from types import ModuleType

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vllm_vtprune import pipeline
from vllm_vtprune import spec as spec_mod
from vllm_vtprune.models import parallel
from vllm_vtprune.models.checks import (SPEC_KEY, check_parallelism, check_supported,
                                         resolved_spec, server_spec)
from vllm_vtprune.server import decisions, stats

TEXT_IDS_KEY = "vtprune_text_ids"  # added to mm_processor_kwargs, hence to the mm hash
SPEC_BYTES = 512  # room for a checkpoint path
MAX_TEXT_IDS = 32
_VTPRUNE_KWARGS = (SPEC_KEY, TEXT_IDS_KEY, decisions.REQUEST_KEY)


def image_token_id(hf_config) -> int:
    """The placeholder token of an image (LLaVA's ``image_token_index``, Qwen's
    ``image_token_id``)."""
    index = getattr(hf_config, "image_token_index", None)
    return index if index is not None else hf_config.image_token_id


def encode_spec(spec: spec_mod.PruneSpec | None) -> torch.Tensor:
    raw = str(spec).encode() if spec is not None else b""
    if len(raw) > SPEC_BYTES:
        raise ValueError(f"vtprune spec {str(spec)!r} is longer than {SPEC_BYTES} bytes")
    return torch.tensor(list(raw) + [0] * (SPEC_BYTES - len(raw)), dtype=torch.int64, device="cpu")


def decode_spec(row: torch.Tensor) -> spec_mod.PruneSpec | None:
    raw = bytes(int(b) for b in row.tolist() if b)
    return spec_mod.parse(raw.decode()) if raw else None


def encode_text_ids(ids: Sequence[int]) -> torch.Tensor:
    ids = list(ids)[:MAX_TEXT_IDS]
    return torch.tensor(ids + [-1] * (MAX_TEXT_IDS - len(ids)), dtype=torch.int64, device="cpu")


class PruningInfo:
    """Processing-info mixin: the effective spec of a request and its placeholder count."""

    family: ModuleType  # the family module (vllm_vtprune.families.*)

    def get_hf_processor(self, **kwargs: object):
        # The API server builds the processor before the engine builds the model; fail
        # here first, with our message rather than a missing-image-processor error.
        check_supported(self.ctx.model_config.hf_config)
        return super().get_hf_processor(**kwargs)

    def effective_spec(self, mm_kwargs: Mapping[str, object]) -> spec_mod.PruneSpec | None:
        """The request's override if it has one, else the server's spec."""
        server = server_spec(self.get_hf_config())
        if SPEC_KEY in mm_kwargs:
            try:
                spec = resolved_spec(spec_mod.parse(mm_kwargs[SPEC_KEY]), self.get_hf_config())
                # a server started with an in-LLM spec has the masked decoder: any spec
                pipeline.check_servable(spec, self.family.FAMILY,
                                        server=pipeline.acts_in_llm(server))
                if pipeline.acts_in_llm(spec):
                    self.check_fits(spec)
            except ValueError as err:
                raise ValueError(f"mm_processor_kwargs.vtprune: {err}") from None
            return spec
        return server

    def check_fits(self, spec) -> None:
        """An in-LLM spec that cannot run on this decoder is refused before it is queued."""
        from vllm_vtprune import families

        hf = self.get_hf_config()
        pipeline.check_fits_decoder(spec, hf.text_config.num_hidden_layers,
                                    hf.text_config.hidden_size,
                                    families.image_tokens(self.family.FAMILY, hf))

    def get_num_image_tokens(self, *, image_width: int, image_height: int,
                             spec: spec_mod.PruneSpec | None = None) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        if spec is None:
            return full
        prunable = self.family.FAMILY.prunable_tokens
        return pipeline.kept_tokens(spec, full, None if prunable is None else
                                    prunable(self.get_hf_config(), image_width, image_height))

    def noun_token_ids(self, prompt_ids: list[int]) -> list[int]:
        tokenizer = self.get_tokenizer()
        return pipeline.noun_ids(tokenizer, self.family.FAMILY.question_ids(tokenizer, prompt_ids),
                                 {image_token_id(self.get_hf_config())}, MAX_TEXT_IDS)


def _refuse_foreign_request_kwargs(inputs) -> None:
    """Only ``vtprune`` may come with a request: other HF processor options (a crop size,
    say) would change the pixel grid the engine expects and crash it for every client."""
    foreign = sorted(k for k in inputs.hf_processor_mm_kwargs if k not in _VTPRUNE_KWARGS)
    if foreign or inputs.media_io_kwargs:
        raise ValueError(
            f"mm_processor_kwargs {foreign or list(inputs.media_io_kwargs)} are not accepted "
            f"by this server; accepted: {{'{SPEC_KEY}': SPEC}}")


class PruningProcessor:
    """Multimodal-processor mixin: the spec and the nouns in the hash, the per-image
    fields the model reads, and placeholders of the kept count."""

    def apply(self, inputs, timing_ctx):
        # Folding the spec and the nouns into mm_processor_kwargs makes them part of the
        # multimodal hash (processor, encoder and prefix caches), see module docstring.
        _refuse_foreign_request_kwargs(inputs)
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        # The middleware's tag is no part of the request's identity: out of the hash.
        request_key = kwargs.pop(decisions.REQUEST_KEY, None)
        spec = self.info.effective_spec(kwargs)
        kwargs[SPEC_KEY] = str(spec) if spec is not None else "none"
        kwargs.pop(TEXT_IDS_KEY, None)
        if pipeline.is_text_conditioned(spec):
            kwargs[TEXT_IDS_KEY] = tuple(self.info.noun_token_ids(list(inputs.prompt)))
        out = super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs),
                            timing_ctx)
        if request_key is not None:
            decisions.record(str(request_key), self._decision(inputs, out, spec))
        return out

    def _decision(self, inputs, out, spec) -> decisions.Decision:
        """Per image: the placeholder count vLLM got, and the unpruned count."""
        items = inputs.mm_data_items
        sizes = ([items.get_items("image", ImageProcessorItems).get_image_size(i)
                  for i in range(items.get_count("image"))] if "image" in items else [])
        before = tuple(self.info.get_num_image_tokens(image_width=s.width, image_height=s.height)
                       for s in sizes)
        after = tuple(p.length for p in out["mm_placeholders"].get("image", []))
        prunable = self.info.family.FAMILY.prunable_tokens
        return decisions.Decision(spec.method if spec is not None else "none",
                                  spec.budget if spec is not None else None, before, after,
                                  str(spec) if spec is not None else "none",
                                  tuple(prunable(self.info.get_hf_config(), s.width, s.height)
                                        for s in sizes) if prunable else ())

    def _call_hf_processor(self, hf_data, hf_kwargs):
        kwargs = {k: v for k, v in hf_kwargs.items() if k not in _VTPRUNE_KWARGS}
        out = super()._call_hf_processor(hf_data, kwargs)
        num_images = (len(out["image_grid_thw"]) if "image_grid_thw" in out  # Qwen: flat pixels
                      else len(out["pixel_values"]) if "pixel_values" in out else 0)
        spec = self.info.effective_spec(hf_kwargs)
        out["vtprune_spec"] = encode_spec(spec).repeat(num_images, 1)
        out["vtprune_text_ids"] = encode_text_ids(hf_kwargs.get(TEXT_IDS_KEY, ())).repeat(
            num_images, 1)
        return out

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]):
        return dict(**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                    vtprune_spec=MultiModalFieldConfig.batched("image"),
                    vtprune_text_ids=MultiModalFieldConfig.batched("image"))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        placeholder = image_token_id(self.info.get_hf_config())
        spec = self.info.effective_spec(hf_processor_mm_kwargs)

        if "image" in mm_items and not isinstance(mm_items["image"], ImageProcessorItems):
            raise ValueError("vtprune prunes images inside the model; precomputed image "
                             "embeddings are not accepted, send the images themselves")

        def replacement(item_idx: int):
            images = mm_items.get_items("image", ImageProcessorItems)
            size = images.get_image_size(item_idx)
            n = self.info.get_num_image_tokens(image_width=size.width,
                                               image_height=size.height, spec=spec)
            return [placeholder] * n

        return [PromptReplacement(modality="image", target=[placeholder],
                                  replacement=replacement)]


class PruningModel:
    """Model mixin: each image of a batch pruned on its own under its request's spec
    (``_prune_one``, the family's), the nouns embedded with the LLM's own table."""

    family: ModuleType
    _in_llm = False

    def _check_family(self, vllm_config) -> None:
        if check_supported(vllm_config.model_config.hf_config) is not self.family.FAMILY:
            raise ValueError(f"vtprune: {self.family.ARCHITECTURE} serves "
                             f"{self.family.FAMILY.name} models only; leave the "
                             "architecture to --vtprune")

    def _prune_one(self, image_input, index: int, spec, text) -> pipeline.PrunedImage:
        raise NotImplementedError

    def _build(self, vllm_config, build) -> None:
        """Build the stock model (``build()``: its ``__init__``); a server whose spec
        prunes inside the LLM gets the masked attention in its decoder layers and the
        explicit layer loop of :mod:`vllm_vtprune.models.in_llm`."""
        self._check_family(vllm_config)
        spec = server_spec(vllm_config.model_config.hf_config)
        check_parallelism(vllm_config, spec)
        if not pipeline.acts_in_llm(spec):
            build()
            return
        from vllm_vtprune.models import in_llm

        with in_llm.masked_attention(vllm_config, spec, self.family):
            build()
        self._in_llm = True
        in_llm.install_decoder(self.language_model.model)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None,
                        **kwargs):
        if self._in_llm:  # which rows of this step are image tokens, under which spec
            from vllm_vtprune.models import in_llm

            in_llm.record_images(is_multimodal, multimodal_embeddings)
        return super().embed_input_ids(input_ids, multimodal_embeddings,
                                       is_multimodal=is_multimodal, **kwargs)

    def embed_multimodal(self, **kwargs: object):
        specs = kwargs.pop("vtprune_spec", None)
        text_ids = kwargs.pop("vtprune_text_ids", None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values" or specs is None:
            return self._process_image_input(image_input)
        started = time.perf_counter()
        parsed = [decode_spec(specs[i]) for i in range(len(specs))]
        images = [self._embed_one(image_input, i, spec, text_ids[i])
                  for i, spec in enumerate(parsed)]
        if parallel.tp_rank() == 0:  # one count per image, not one per rank
            stats.add(len(images), time.perf_counter() - started,
                      sum(image.prune_seconds for image in images))
        return [self._tokens(image, spec) for image, spec in zip(images, parsed)]

    def _embed_one(self, image_input, index: int, spec, text_ids: torch.Tensor):
        text = None
        ids = text_ids[text_ids >= 0]
        if pipeline.is_text_conditioned(spec) and ids.numel():
            embed = self.language_model.model.embed_tokens
            text = embed(ids.to(embed.weight.device))
        image = self._prune_one(image_input, index, spec, text)
        pipeline.trace(spec, ids.tolist(), image, rank=parallel.tp_rank())  # this rank's own
        return parallel.from_first_rank(image)

    def _tokens(self, image: pipeline.PrunedImage, spec) -> torch.Tensor:
        if self._in_llm:  # the decoder loop reads each image's spec off its embeddings
            from vllm_vtprune.models import in_llm

            return in_llm.tag(image.tokens, spec, image.num_patches)
        return image.tokens
