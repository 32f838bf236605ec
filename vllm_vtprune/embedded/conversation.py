"""Token-level encoding of ShapesVQA samples in the LLaVA-1.5 conversation format, shared by
training and the transformers evaluation path."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vllm_vtprune.embedded import build
from vllm_vtprune.embedded.build import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID

NUM_IMAGE_TOKENS = 576
CLIP_MEAN = torch.tensor(build.CLIP_MEAN).view(3, 1, 1)
CLIP_STD = torch.tensor(build.CLIP_STD).view(3, 1, 1)
# LLaVA-1.5's short-answer instruction; training sometimes appends it so that benchmark-style
# prompts are in distribution.
FORMAT_HINT = "Answer the question using a single word or phrase."
IGNORE = -100
SEQUENCE_BUCKET = 128
IMAGE_PREFIX = "USER: <image>\n"


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """CLIP normalisation of 336x336 RGB images (what CLIPImageProcessor does at that size)."""
    return normalise(np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]))


def normalise(images: np.ndarray) -> torch.Tensor:
    """CLIP normalisation of uint8 [B, 336, 336, 3] arrays to [B, 3, 336, 336]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - CLIP_MEAN) / CLIP_STD


def question_text(question: str, hint: bool = False) -> str:
    suffix = f"\n{FORMAT_HINT}" if hint else ""
    return f"{question}{suffix} ASSISTANT:"


def user_turn(question: str, hint: bool = False) -> str:
    """The LLaVA-1.5 single-question prompt (without ``<s>``)."""
    return IMAGE_PREFIX + question_text(question, hint)


def encode_prompt(tokenizer, question: str, hint: bool = False,
                  num_image_tokens: int = NUM_IMAGE_TOKENS) -> list[int]:
    ids = tokenizer(user_turn(question, hint), add_special_tokens=False).input_ids
    return [BOS_ID] + expand_image_tokens(ids, num_image_tokens)


def expand_image_tokens(ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for t in ids:
        out.extend([IMAGE_TOKEN_ID] * n if t == IMAGE_TOKEN_ID else [t])
    return out


def encode_packed(tokenizer, qas, hints: list[bool],
                  num_image_tokens: int = NUM_IMAGE_TOKENS) -> tuple[list[int], ...]:
    """Several questions on one image packed in one training sequence, each as if asked alone.

    The image prefix (``<s>USER: <image>``) is shared; every turn ``{question} ASSISTANT:
    {answer}</s>`` follows it at the same positions a single-question prompt would use, and
    :func:`packed_attention_mask` lets it see only the prefix and itself. A plain multi-turn
    sequence let later turns copy earlier ones (the position question "is the red circle on
    the left" says a red circle exists), and the model learnt to answer "yes" only to what
    had been mentioned. Returns ``(ids, labels, positions, segments)``; segment 0 is the
    prefix, turn ``k`` is segment ``k``; only answer tokens and their ``</s>`` carry labels.
    """
    prefix = tokenizer(IMAGE_PREFIX, add_special_tokens=False).input_ids
    ids = [BOS_ID] + expand_image_tokens(prefix, num_image_tokens)
    labels, positions, segments = [IGNORE] * len(ids), list(range(len(ids))), [0] * len(ids)
    start = len(ids)
    for turn, (qa, hint) in enumerate(zip(qas, hints), start=1):
        prompt = tokenizer(question_text(qa.question, hint), add_special_tokens=False).input_ids
        answer = tokenizer(qa.answer, add_special_tokens=False).input_ids + [EOS_ID]
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
        positions += range(start, start + len(prompt) + len(answer))
        segments += [turn] * (len(prompt) + len(answer))
    return ids, labels, positions, segments


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, L, L] mask for :func:`encode_packed` sequences (padding: segment -1):
    causal, and a turn's tokens see the shared prefix (segment 0) and their own turn only."""
    query, key = segments[:, :, None], segments[:, None, :]
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (causal & (key >= 0) & ((key == 0) | (key == query)))[:, None]


def pad_right(seqs: list[list[int]], value: int, multiple: int = 1) -> torch.Tensor:
    width = -(-max(len(s) for s in seqs) // multiple) * multiple
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def collate(tokenizer, conversations, counts: list[int],
            rng) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ``(input_ids, attention_mask [B, 1, L, L], position_ids, labels)`` of packed
    training sequences (:func:`encode_packed`): each image's questions in a shuffled order,
    30 % of turns with the short-answer hint, ``counts[i]`` image tokens for image ``i``."""
    ids, labels, positions, segments = [], [], [], []
    for qas, n in zip(conversations, counts):
        qas = list(qas)
        rng.shuffle(qas)
        seq, lab, pos, seg = encode_packed(tokenizer, qas, [rng.random() < 0.3 for _ in qas], n)
        ids.append(seq)
        labels.append(lab)
        positions.append(pos)
        segments.append(seg)
    # A few fixed widths instead of a new one every step: the training process's memory
    # grows with the number of distinct activation sizes (peak after 80 language steps:
    # 8.2 GB unpadded, 5.3 GB in buckets of 128; it still grows, more slowly).
    pad = lambda seqs, value: pad_right(seqs, value, SEQUENCE_BUCKET)  # noqa: E731
    return (pad(ids, PAD_ID), packed_attention_mask(pad(segments, -1)), pad(positions, 0),
            pad(labels, IGNORE))
