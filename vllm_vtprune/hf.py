"""transformers reference path: the same pruning on ``LlavaForConditionalGeneration``
(and ``LlavaNextForConditionalGeneration``: :class:`HfNextReference`).

It runs :func:`vllm_vtprune.pipeline.prune_image` on transformers' CLIP tower and
projector, with the same noun conditioning as the vLLM processor, then decodes greedily.
It is the reference the vLLM parity test compares against, and the path for RCP training
and GPU benchmarks (no vLLM needed).

    ref = HfReference.load(path)  # the class of the checkpoint's family
    answer, images = ref.generate("USER: <image>\\nis there a red circle ? ASSISTANT:",
                                  [image], spec_mod.parse("resprune:64"))
"""
from __future__ import annotations

import importlib

import torch

from vllm_vtprune import pipeline, registry
from vllm_vtprune import spec as spec_mod
from vllm_vtprune.families import llava as family


class HfReference:
    model_class = "LlavaForConditionalGeneration"

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        cfg = model.config
        self.image_token_id = cfg.image_token_index
        tower = model.model.vision_tower
        # transformers 5 flattened CLIPVisionModel; 4.x kept it under .vision_model
        self.tower = family.HfClipTower(getattr(tower, "vision_model", tower),
                                        cfg.vision_config, cfg.vision_feature_layer)

    @classmethod
    def load(cls, path: str, dtype=torch.float32) -> "HfReference":
        """The reference of the checkpoint at ``path``, of its family's class."""
        import transformers
        from transformers import AutoConfig, AutoProcessor

        if cls is HfReference:  # the family's own reference class
            from vllm_vtprune import families

            family = families.for_config(AutoConfig.from_pretrained(path))
            module, name = family.reference.split(":")
            cls = getattr(importlib.import_module(module), name)
        model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=dtype)
        return cls(model, AutoProcessor.from_pretrained(path))

    def pixel_values(self, images) -> torch.Tensor:
        images = [_to_rgb(im) for im in images]
        out = self.processor.image_processor(images=images, return_tensors="pt")
        # float32, as vLLM's processor gives them; the tower casts
        return out["pixel_values"].to(self.device)

    @torch.no_grad()
    def image_tokens(self, pixel_values, spec, prompt_ids: list[int]):
        """One :class:`~vllm_vtprune.pipeline.PrunedImage` per image, as vLLM computes them
        (``spec`` as vLLM serves it on this model: the family's option defaults added)."""
        spec = self.resolved(spec)
        text = self.noun_embeds(prompt_ids) if pipeline.is_text_conditioned(spec) else None
        return [self.prune_one(pixel_values, i, spec, text) for i in range(len(pixel_values))]

    @torch.no_grad()
    def noun_embeds(self, prompt_ids: list[int]) -> torch.Tensor | None:
        """[T, D] the input embeddings of the nouns of the prompt's last user turn (what
        text-conditioned methods compare with), None without nouns."""
        question = family.question_ids(self.tokenizer, prompt_ids)
        ids = pipeline.noun_ids(self.tokenizer, question, {self.image_token_id})
        if not ids:
            return None
        return self.model.get_input_embeddings()(torch.tensor(ids, device=self.device))

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (``model.to("cuda")`` runs the reference there)."""
        return next(self.model.parameters()).device

    def resolved(self, spec):
        """``spec`` as vLLM serves it on this model (shipped modules, family defaults)."""
        from vllm_vtprune.models.checks import resolved_spec

        return resolved_spec(spec, self.model.config)

    def prune_one(self, pixel_values, index: int, spec, text) -> pipeline.PrunedImage:
        return pipeline.prune_image(self.tower, self.model.model.multi_modal_projector,
                                    pixel_values[index:index + 1], spec, text)

    @torch.no_grad()
    def generate(self, prompt: str, images, spec: spec_mod.PruneSpec | None,
                 max_new_tokens: int = 4) -> tuple[str, list]:
        """Greedy answer to ``prompt`` (one ``<image>`` per image) and the pruned images.

        Methods that act inside the LLM get every visual token from the encoder and run
        through :class:`vllm_vtprune.llm_loop.PrunedDecoder`, pruned rows removed."""
        spec = self.resolved(spec)
        pruned, ids, feats = self.prompt_inputs(prompt, images, spec)
        if pipeline.acts_in_llm(spec):
            return self._generate_in_llm(ids, feats, pruned, spec, max_new_tokens), pruned
        return self.greedy(ids, feats, max_new_tokens), pruned

    @torch.no_grad()
    def greedy(self, ids: list[int], feats: torch.Tensor | None,
               max_new_tokens: int = 4) -> str:
        """Greedy answer to expanded prompt ``ids`` with ``feats`` [K, D] at its image
        tokens (whatever chose them)."""
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(torch.argmax(self._last_logits(ids + out, feats)))
            if nxt == self.tokenizer.eos_token_id:
                break
            out.append(nxt)
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def prompt_inputs(self, prompt: str, images, spec):
        """The pruned images, the prompt's ids with each image expanded to its kept
        count, and the kept tokens of every image in prompt order ([K, D] or None)."""
        prompt_ids = self.tokenizer(prompt).input_ids
        pruned = self.image_tokens(self.pixel_values(images), spec, prompt_ids)
        ids = _expand(prompt_ids, self.image_token_id, [p.tokens.shape[0] for p in pruned])
        feats = torch.cat([p.tokens for p in pruned]) if pruned else None
        return pruned, ids, feats

    def decoder(self):
        from vllm_vtprune import llm_loop

        return llm_loop.PrunedDecoder(self.model.model.language_model, self.model.lm_head)

    def llm_plan(self, ids: list[int], counts: list[int], spec, num_layers: int,
                 patches: list[int] | None = None):
        """The in-LLM plan of one request whose expanded prompt ``ids`` holds images of
        ``counts`` tokens each (``patches``: each image's unpruned patch count, by
        default the family's fixed count)."""
        from vllm_vtprune import llm_loop

        spans = llm_loop.spans_of(torch.tensor(ids, device=self.device) == self.image_token_id,
                                  counts)
        return registry.get(spec.method).llm_plan(
            spec, spans, num_layers, patches if patches is not None else self.full_tokens())

    def full_tokens(self) -> int:
        """Every image's unpruned token count, where the family fixes one (LLaVA-1.5)."""
        from vllm_vtprune import families

        config = self.model.config
        fixed = families.fixed_image_tokens(families.for_config(config), config)
        if fixed is None:
            raise ValueError("this model's images differ in size: pass each image's patches")
        return fixed

    def _generate_in_llm(self, ids: list[int], feats, pruned, spec, max_new_tokens: int,
                         positions: torch.Tensor | None = None) -> str:
        """Greedy answer through the explicit loop; ``positions``: the prompt's ([3, T]
        for M-RoPE; default 0..T-1), the answer's following the last one."""
        decoder = self.decoder()
        plan = self.llm_plan(ids, [p.tokens.shape[0] for p in pruned], spec,
                             decoder.num_layers, [p.num_patches for p in pruned])
        embed = self.model.get_input_embeddings()
        logits, cache = decoder.prefill(self.prompt_embeds(ids, feats), plan,
                                        positions=positions)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(torch.argmax(logits))
            if nxt == self.tokenizer.eos_token_id:
                break
            out.append(nxt)
            at = (len(ids) + len(out) - 1 if positions is None
                  else positions[:, -1] + len(out))
            logits = decoder.decode(embed(torch.tensor([nxt], device=self.device))[0], at,
                                    cache, plan)
        return self.tokenizer.decode(out, skip_special_tokens=True)

    @torch.no_grad()
    def prompt_embeds(self, ids: list[int], feats: torch.Tensor | None) -> torch.Tensor:
        """[T, D] input embeddings of expanded prompt ids, ``feats`` at the image tokens."""
        ids_t = torch.tensor(ids, device=self.device)
        embeds = self.model.get_input_embeddings()(ids_t)
        if feats is not None:
            embeds[ids_t == self.image_token_id] = feats.to(embeds.dtype)
        return embeds

    def _last_logits(self, ids: list[int], feats: torch.Tensor | None) -> torch.Tensor:
        embeds = self.prompt_embeds(ids, feats)[None]
        hidden = self.model.model.language_model(inputs_embeds=embeds).last_hidden_state
        return self.model.lm_head(hidden[0, -1])


class HfNextReference(HfReference):
    """LLaVA-NeXT: each image's tiles pruned together (:func:`pipeline.prune_tiled`)."""

    model_class = "LlavaNextForConditionalGeneration"

    def pixel_values(self, images) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Per image: its tiles [T, 3, 336, 336] (base first) and its (height, width)."""
        out = self.processor.image_processor(images=[_to_rgb(im) for im in images],
                                             return_tensors="pt")
        return [(tiles.to(self.device), tuple(int(v) for v in size))
                for tiles, size in zip(out["pixel_values"], out["image_sizes"])]

    def prune_one(self, pixel_values, index: int, spec, text) -> pipeline.PrunedImage:
        from vllm_vtprune.families import llava_next

        tiles, size = pixel_values[index]
        layout = llava_next.layout_of(self.model.config, size)
        return pipeline.prune_tiled(self.tower, self.model.model.multi_modal_projector,
                                    tiles[:layout.num_tiles], layout, spec, text,
                                    self.model.model.image_newline)


class HfQwenReference(HfReference):
    """Qwen2-VL: each image's merged tokens pruned at the encoder output, kept tokens
    placed at their unpruned M-RoPE (t, h, w) and the text after an image where it
    stands unpruned (positions from transformers' own ``get_vision_position_ids``)."""

    model_class = "Qwen2VLForConditionalGeneration"

    def __init__(self, model, processor):
        from vllm_vtprune.families import qwen2_vl

        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = model.config.image_token_id
        image_processor = processor.image_processor
        self.tower = qwen2_vl.EncoderTower(
            model.model.visual, model.config.vision_config,
            qwen2_vl.hf_run(image_processor.image_mean, image_processor.image_std,
                            image_processor.rescale_factor))

    def pixel_values(self, images) -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
        """Per image: its patches [t*h*w, C*2*14*14] as raw uint8 bytes (what vLLM hands
        its encoder, which normalises them itself) and its (t, h, w) patch grid."""
        out = self.processor.image_processor(images=[_to_rgb(im) for im in images],
                                             return_tensors="pt", do_rescale=False,
                                             do_normalize=False)
        sizes = out["image_grid_thw"].prod(-1).tolist()
        raw = out["pixel_values"].round().to(torch.uint8)
        return [(pv.to(self.device), tuple(int(v) for v in thw))
                for pv, thw in zip(raw.split(sizes), out["image_grid_thw"])]

    def prune_one(self, pixel_values, index: int, spec, text) -> pipeline.PrunedImage:
        patches, grid_thw = pixel_values[index]
        tower = self.tower.for_image(grid_thw)
        image = pipeline.prune_image(tower, tower.project, patches, spec, text)
        image.grid_thw = grid_thw
        return image

    @torch.no_grad()
    def generate(self, prompt: str, images, spec, max_new_tokens: int = 4):
        """Greedy answer with explicit M-RoPE positions, and the pruned images."""
        spec = self.resolved(spec)
        pruned, ids, feats = self.prompt_inputs(prompt, images, spec)
        positions = self.positions(ids, pruned)
        if pipeline.acts_in_llm(spec):
            return self._generate_in_llm(ids, feats, pruned, spec, max_new_tokens,
                                         positions), pruned
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = self.last_logits(ids + out, feats, positions)
            nxt = int(torch.argmax(logits))
            if nxt == self.tokenizer.eos_token_id:
                break
            out.append(nxt)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        return self.tokenizer.decode(out, skip_special_tokens=True), pruned

    def positions(self, ids: list[int], pruned) -> torch.Tensor:
        """[3, T]: text at consecutive positions; image ``i``'s kept tokens at their
        unpruned grid positions; the text after it from where the unpruned image ends."""
        merge = self.model.config.vision_config.spatial_merge_size
        cols, images, current, i = [], iter(pruned), 0, 0
        while i < len(ids):
            if ids[i] != self.image_token_id:
                cols.append(torch.full((3, 1), current, device=self.device))
                current, i = current + 1, i + 1
                continue
            image = next(images)
            thw = torch.tensor(image.grid_thw, device=self.device)
            full = self.model.model.get_vision_position_ids(current, thw, 1, merge)
            cols.append(full[:, image.origins.to(full.device)].to(self.device))
            current += max(int(thw[1]), int(thw[2])) // merge
            i += image.tokens.shape[0]
        return torch.cat(cols, dim=1)

    def last_logits(self, ids: list[int], feats, positions: torch.Tensor) -> torch.Tensor:
        embeds = self.prompt_embeds(ids, feats)[None]
        hidden = self.model.model.language_model(
            inputs_embeds=embeds, position_ids=positions[:, None, :len(ids)]).last_hidden_state
        return self.model.lm_head(hidden[0, -1])


class HfQwen25Reference(HfQwenReference):
    model_class = "Qwen2_5_VLForConditionalGeneration"


def _to_rgb(image):
    """RGB as vLLM loads it: transparency composited onto white (not dropped)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.split()[3])
    return out


def _expand(prompt_ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    out, image = [], 0
    for t in prompt_ids:
        if t == image_token_id:
            out.extend([image_token_id] * counts[image])
            image += 1
        else:
            out.append(t)
    if image != len(counts):
        raise ValueError(f"prompt has {image} <image> tokens for {len(counts)} images")
    return out
