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
FAMILIES = ("llava", "llava_next")


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


def build(family: str, out_dir: str | Path) -> Path:
    """A checkpoint of ``family`` in its public hub layout, made from the embedded model."""
    import shutil

    from vllm_vtprune.embedded import model_path

    if family == "llava":
        shutil.copytree(model_path(), out_dir, dirs_exist_ok=True)
        return Path(out_dir)
    if family == "llava_next":
        return build_llava_next(model_path(), out_dir)
    raise ValueError(f"unknown family {family!r}; accepted: {', '.join(FAMILIES)}")


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m vllm_vtprune.embedded.build",
        description="Write a small checkpoint of a model family, in its public hub layout "
                    "(vLLM and transformers load it as they load the real ones).")
    p.add_argument("--family", choices=FAMILIES, default="llava")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(build(args.family, args.out))


if __name__ == "__main__":
    main()
