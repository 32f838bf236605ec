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
SEQUENCE_BUCKET = 128


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """CLIP normalisation of 336x336 RGB images (what CLIPImageProcessor does at that size)."""
    return normalise(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]))


def normalise(images: np.ndarray) -> torch.Tensor:
    """CLIP normalisation of uint8 [B, 336, 336, 3] arrays to [B, 3, 336, 336]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
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


def pad_right(seqs: list[list[int]], value: int, multiple: int = 1) -> torch.Tensor:
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def collate(tokenizer, conversations, counts: list[int],
            rng) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ``(input_ids, attention_mask, labels)`` of multi-turn training sequences:
    each conversation's questions in a shuffled order, 30 % of turns with the short-answer
    hint, ``counts[i]`` image tokens for conversation ``i``."""
    ids, labels = [], []
    for qas, n in zip(conversations, counts):
        qas = list(qas)
        rng.shuffle(qas)
        seq, lab = encode_conversation(tokenizer, qas, [rng.random() < 0.3 for _ in qas], n)
        ids.append(seq)
        labels.append(lab)
    # A few fixed widths instead of a new one every step: the training process's memory
    # grows with the number of distinct activation sizes (peak after 80 language steps:
    # 8.2 GB unpadded, 5.3 GB in buckets of 128; it still grows, more slowly).
    input_ids = pad_right(ids, PAD_ID, SEQUENCE_BUCKET)
    return input_ids, (input_ids != PAD_ID).long(), pad_right(labels, IGNORE, SEQUENCE_BUCKET)
