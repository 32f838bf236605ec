"""Token-level encoding of ShapesVQA samples in the LLaVA-1.5 conversation format, shared by
training and the transformers evaluation path."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vllm_vtprune.embedded.build import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID

NUM_IMAGE_TOKENS = 576
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
# LLaVA-1.5's short-answer instruction; training sometimes appends it so that benchmark-style
# prompts are in distribution.
FORMAT_HINT = "Answer the question using a single word or phrase."
IGNORE = -100


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """CLIP normalisation of 336x336 RGB images (what CLIPImageProcessor does at that size)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 255.0
    return (x - CLIP_MEAN) / CLIP_STD


def user_turn(question: str, first: bool, hint: bool = False) -> str:
    image = "<image>\n" if first else ""
    suffix = f"\n{FORMAT_HINT}" if hint else ""
    return f"USER: {image}{question}{suffix} ASSISTANT:"


def encode_prompt(tokenizer, question: str, hint: bool = False,
                  num_image_tokens: int = NUM_IMAGE_TOKENS) -> list[int]:
    ids = tokenizer(user_turn(question, True, hint), add_special_tokens=False).input_ids
    return [BOS_ID] + expand_image_tokens(ids, num_image_tokens)


def expand_image_tokens(ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for t in ids:
        out.extend([IMAGE_TOKEN_ID] * n if t == IMAGE_TOKEN_ID else [t])
    return out


def encode_conversation(tokenizer, qas, hints: list[bool],
                        num_image_tokens: int = NUM_IMAGE_TOKENS) -> tuple[list[int], list[int]]:
    """Multi-turn training sequence; only answer tokens and their ``</s>`` carry labels."""
    ids, labels = [BOS_ID], [IGNORE]
    for turn, (qa, hint) in enumerate(zip(qas, hints)):
        prompt = tokenizer(user_turn(qa.question, turn == 0, hint), add_special_tokens=False).input_ids
        prompt = expand_image_tokens(prompt, num_image_tokens)
        answer = tokenizer(qa.answer, add_special_tokens=False).input_ids + [EOS_ID]
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    return ids, labels


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def collate(tokenizer, samples, rng, counts: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A padded batch; ``counts`` gives each sample's number of image tokens (576 default)."""
    ids, labels = [], []
    for n, s in enumerate(samples):
        qas = list(s.qas)
        rng.shuffle(qas)
        num = NUM_IMAGE_TOKENS if counts is None else counts[n]
        i, l = encode_conversation(tokenizer, qas, [rng.random() < 0.3 for _ in qas], num)
        ids.append(i)
        labels.append(l)
    input_ids = pad_right(ids, PAD_ID)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != PAD_ID).long(),
        "labels": pad_right(labels, IGNORE),
        "pixel_values": pixel_values([s.image for s in samples]),
    }
