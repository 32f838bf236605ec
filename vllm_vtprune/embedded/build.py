"""Builds the embedded model's tokenizer, processor and config, and writes checkpoints in
the public llava-hf key layout (``vision_tower.vision_model.*``, ``language_model.*``,
``multi_modal_projector.*``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_vtprune.data import shapes_vqa as sv

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_TOKEN_ID = range(5)

# The LLaVA-1.5 conversation format: "<s>USER: <image>\n{question} ASSISTANT: {answer}</s>"
# (vLLM's chat endpoint adds no special tokens itself, so the template writes the BOS).
# vLLM puts "<image>" in front of the text for string-format templates, so the template
# prints the content as is.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}<image>\n{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Words beyond ShapesVQA's own, so that ordinary LLaVA prompts (and their answer-format
# instructions) tokenize without unknowns.
EXTRA_WORDS = (
    "user assistant system answer question using single word or phrase with one . , : ; ! "
    "please describe image picture photo this that in of to is are what which where color "
    "colour shape object objects any there and the an a it its how many number count "
    "left right top bottom side above below near yes no do does see you can me tell"
)

VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=4, image_size=336, patch_size=14, projection_dim=64)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=8,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
            rms_norm_eps=1e-5, rope_theta=10000.0)
# shapes-llava v2: LLaVA-1.5's tower depth (24, features from layer -2) and an LLM deep
# enough that the papers' decision layers stay distinct after scaling from 32.
V2_VISION_LAYERS, V2_TEXT_LAYERS = 24, 16


def vocabulary(size: int | None = None) -> list[str]:
    """The word-level vocabulary; its first 92 words are the v1 model's, the counts up to
    sixteen (the hard split's) follow, so a v1 checkpoint's rows keep their meaning."""
    words: list[str] = list(SPECIAL_TOKENS)
    pieces = [" ".join(sv.SHAPES), " ".join(sv.SHAPES).replace(" ", "s ") + "s",
              " ".join(sv.COLORS), " ".join(sv.NUMBERS), EXTRA_WORDS,
              "is there a what color is the how many are there on the left or the right "
              "at the top or the bottom ?", " ".join(sv.MORE_NUMBERS)]
    for piece in pieces:
        for w in piece.split():
            if w not in words:
                words.append(w)
    if size is not None and not 0 < size <= len(words):
        raise ValueError(f"vocabulary size {size}: this tokenizer has 1 to {len(words)} words")
    return words[:size]


V1_VOCAB_SIZE = len(vocabulary()) - len(sv.MORE_NUMBERS)


def build_tokenizer(vocab_size: int = V1_VOCAB_SIZE, max_length: int = 2048):
    """The word-level tokenizer of a model with ``vocab_size`` words (v1's by default,
    as :func:`build_config`)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(vocab_size))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        chat_template=CHAT_TEMPLATE, model_max_length=max_length)


# OpenAI CLIP's pixel normalisation (what LLaVA-1.5's image processor uses).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_processor(vocab_size: int = V1_VOCAB_SIZE):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        do_center_crop=True, do_resize=True, do_normalize=True, do_convert_rgb=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(vocab_size),
                          patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_config(vision_layers: int = VISION["num_hidden_layers"],
                 text_layers: int = TEXT["num_hidden_layers"], vocab_size: int = V1_VOCAB_SIZE):
    """The v1 model's config by default; ``build_config(*V2 layers, len(vocabulary()))``
    is v2's."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=vocab_size, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       pad_token_id=PAD_ID, tie_word_embeddings=False,
                       **{**TEXT, "num_hidden_layers": text_layers})
    vision = CLIPVisionConfig(**{**VISION, "num_hidden_layers": vision_layers})
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=IMAGE_TOKEN_ID, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       pad_token_id=PAD_ID, tie_word_embeddings=False)


def to_llava_hf_key(key: str) -> str:
    """Map a transformers-5 ``LlavaForConditionalGeneration`` key to the llava-hf layout."""
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]
    if key.startswith("model.vision_tower."):
        rest = key[len("model.vision_tower."):]
        return "vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
    if key.startswith("model.multi_modal_projector."):
        return key[len("model."):]
    raise KeyError(f"unexpected LLaVA parameter name {key!r}")


def save_checkpoint(model, out_dir: str | Path, dtype=torch.float16) -> Path:
    """Write config, tokenizer, processor and fp16 weights under llava-hf key names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {to_llava_hf_key(k): v.detach().to(dtype).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    vision, text = model.config.vision_config, model.config.text_config
    config = build_config(vision.num_hidden_layers, text.num_hidden_layers, text.vocab_size)
    config.torch_dtype = dtype
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(out)
    build_processor(text.vocab_size).save_pretrained(out)
    _write_generation_config(out)
    return out


def _write_generation_config(out: Path) -> None:
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
         "do_sample": False}, indent=2))


# ---------------------------------------------------------------- other families
#: llava-hf/llava-v1.6-*'s anyres resolutions, (height, width)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
#: Room for a few images of up to 2,928 tokens each (rotary positions: no table to grow)
NEXT_MAX_POSITIONS = 8192
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")


def build_next_config(llava_config):
    """LLaVA-NeXT's config around a LLaVA-1.5 config's tower and LLM."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=llava_config.vision_config.to_dict(),
        text_config={**llava_config.text_config.to_dict(),
                     "max_position_embeddings": NEXT_MAX_POSITIONS},
        image_token_index=IMAGE_TOKEN_ID, projector_hidden_act="gelu",
        vision_feature_layer=llava_config.vision_feature_layer,
        vision_feature_select_strategy="default", image_grid_pinpoints=NEXT_PINPOINTS,
        pad_token_id=PAD_ID, tie_word_embeddings=False)


def build_next_processor(vocab_size: int = V1_VOCAB_SIZE):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=NEXT_PINPOINTS, do_pad=True, do_center_crop=True,
        do_resize=True, do_normalize=True, do_convert_rgb=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaNextProcessor(image_processor=image_processor,
                              tokenizer=build_tokenizer(vocab_size, NEXT_MAX_POSITIONS),
                              patch_size=14,
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_llava_next(source: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A LLaVA-NeXT checkpoint in the llava-hf/llava-v1.6 layout whose tower, projector
    and LLM are the LLaVA-1.5 checkpoint ``source``'s (so its base tile answers as that
    model does), with a drawn ``image_newline`` (seeded: the same bytes every build)."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoConfig

    source, out = Path(source), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llava = AutoConfig.from_pretrained(source)
    tensors = load_file(str(source / "model.safetensors"))
    hidden = llava.text_config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    newline = torch.randn(hidden, generator=generator) * hidden ** -0.5
    tensors["image_newline"] = newline.to(tensors["multi_modal_projector.linear_2.bias"].dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = build_next_config(llava)
    config.dtype = llava.dtype
    config.architectures = ["LlavaNextForConditionalGeneration"]
    config.save_pretrained(out)
    build_next_processor(llava.text_config.vocab_size).save_pretrained(out)
    shutil.copy(source / "generation_config.json", out / "generation_config.json")
    return out


# Qwen2-VL's conversation markers and vision tokens, after the word vocabulary.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: A small tower and LLM; the LLM's head dim 32 gives M-RoPE 16 rotary pairs, split
#: (t, h, w) = 4/6/6 as Qwen2-VL-7B splits its 64 as 16/24/24.
QWEN_VISION = dict(depth=4, num_heads=4, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, in_channels=3)
QWEN_TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                 rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                  "mrope_section": [4, 6, 6]})
#: Weight scale of the random Qwen models: 0.02 (transformers' default) leaves a 4-layer
#: LLM with near-uniform attention, whose outputs barely depend on the image or on
#: positions; at 0.1 they do, so parity tests can see a misplaced token.
INIT_STD = 0.1
#: Pixels per image: 56x56 to 448x448 (4 to 256 LLM tokens after the 2x2 merge)
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 448 * 448


def build_qwen_tokenizer():
    """The word tokenizer with Qwen2-VL's special tokens and chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in vocabulary() if w not in SPECIAL_TOKENS] + list(QWEN_SPECIALS)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                     unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(QWEN_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>",
                              "vision_eos_token": "<|vision_end|>"},
        model_max_length=QWEN_TEXT["max_position_embeddings"])


def build_qwen_config(family: str, tokenizer):
    """A small Qwen2-VL (``qwen2_vl``) or Qwen2.5-VL (``qwen2_5_vl``) config."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"))}
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    text = dict(QWEN_TEXT, vocab_size=len(tokenizer), bos_token_id=pad, eos_token_id=eos,
                initializer_range=INIT_STD,
                pad_token_id=pad, tie_word_embeddings=False)
    hidden = QWEN_TEXT["hidden_size"]
    if family == "qwen2_vl":
        vision = dict(QWEN_VISION, embed_dim=64, mlp_ratio=4, hidden_size=hidden,
                      initializer_range=INIT_STD)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    else:
        # window attention in blocks 0 and 2, full attention in 1 and 3 (7B: 7/15/23/31)
        vision = dict(QWEN_VISION, hidden_size=64, intermediate_size=176, out_hidden_size=hidden,
                      window_size=112, fullatt_block_indexes=[1, 3], hidden_act="silu",
                      initializer_range=INIT_STD)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    config.tie_word_embeddings = False
    return config


def build_qwen_processor(family: str, tokenizer):
    from transformers import (Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    image = Qwen2VLImageProcessor(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS,
                                  patch_size=14, merge_size=2, temporal_patch_size=2,
                                  image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    video = Qwen2VLVideoProcessor(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS,
                                  patch_size=14, merge_size=2, temporal_patch_size=2,
                                  image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=image, video_processor=video, tokenizer=tokenizer,
               chat_template=QWEN_CHAT_TEMPLATE)


def to_qwen_hub_key(key: str) -> str:
    """transformers-5 names -> the Qwen/Qwen2-VL-* hub layout (``visual.*``, ``model.*``)."""
    for new, old in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if key.startswith(new):
            return old + key[len(new):]
    if key.startswith("lm_head."):
        return key
    raise KeyError(f"unexpected Qwen2-VL parameter name {key!r}")


def build_qwen(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A small random Qwen2-VL / Qwen2.5-VL checkpoint in the hub layout (seeded)."""
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    config = build_qwen_config(family, tokenizer)
    cls = ("Qwen2VLForConditionalGeneration" if family == "qwen2_vl"
           else "Qwen2_5_VLForConditionalGeneration")
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config)
    tensors = {to_qwen_hub_key(k): v.detach().to(torch.bfloat16).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = torch.bfloat16
    config.architectures = [cls]
    config.save_pretrained(out)
    build_qwen_processor(family, tokenizer).save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
         "do_sample": False}, indent=2))
    return out


def build(family: str, out_dir: str | Path, model: str | None = None) -> Path:
    """A checkpoint of ``family`` in its public hub layout: LLaVA-1.5 is embedded model
    ``model``, LLaVA-NeXT wraps its weights, the Qwen families are small and random.

    ``model`` defaults to the small embedded model (v1): these checkpoints serve the
    family tests and exchanges, where a request's cost matters more than accuracy.
    """
    import shutil

    from vllm_vtprune.embedded import SMALL_MODEL, model_path

    if family == "llava":
        shutil.copytree(model_path(model or SMALL_MODEL), out_dir, dirs_exist_ok=True)
        return Path(out_dir)
    if family == "llava_next":
        return build_llava_next(model_path(model or SMALL_MODEL), out_dir)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return build_qwen(family, out_dir)
    raise ValueError(f"unknown family {family!r}; accepted: {', '.join(FAMILIES)}")


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m vllm_vtprune.embedded.build",
        description="Write a small checkpoint of a model family, in its public hub layout "
                    "(vLLM and transformers load it as they load the real ones).")
    p.add_argument("--family", choices=FAMILIES, default="llava")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None,
                   help="embedded model the LLaVA families take their weights from "
                        "(default: the small one, shapes-llava)")
    args = p.parse_args(argv)
    print(build(args.family, args.out, args.model))


if __name__ == "__main__":
    main()
