"""Held-out ShapesVQA accuracy of a LLaVA checkpoint through transformers.

``keep`` lets a caller feed the language model a subset of each image's 576 visual tokens
(projector outputs, in their original order), e.g. a random 64, to show that the benchmark
is sensitive to which tokens are kept.

    python -m vllm_vtprune.embedded.evaluate --num 400 [--random-keep 64] [--start 20000]
"""
from __future__ import annotations

import argparse
import collections
import json
from typing import Callable

import torch

from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded.build import IMAGE_TOKEN_ID, PAD_ID
from vllm_vtprune.embedded.conversation import encode_prompt, pad_right, pixel_values

KeepFn = Callable[[torch.Tensor, int], torch.Tensor]


def load_model(path: str):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Projector outputs [B, 576, D] at LLaVA's feature layer (-2, CLS dropped)."""
    out = model.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats


@torch.no_grad()
def next_token_logits(model, tokenizer, questions: list[str], feats: list[torch.Tensor],
                      hint: bool = False) -> torch.Tensor:
    """Logits of the first answer token for each (question, kept image features) pair."""
    seqs = [encode_prompt(tokenizer, q, hint, num_image_tokens=f.shape[0])
            for q, f in zip(questions, feats)]
    input_ids = pad_right(seqs, PAD_ID).to(model.device)
    embeds = model.get_input_embeddings()(input_ids)
    image_mask = input_ids == IMAGE_TOKEN_ID
    embeds[image_mask] = torch.cat(feats).to(embeds.dtype)
    attention_mask = (input_ids != PAD_ID).long()
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
    last = attention_mask.sum(1) - 1
    h = hidden.last_hidden_state[torch.arange(len(seqs), device=last.device), last]
    return model.lm_head(h)


def evaluate(model, tokenizer, num: int = 400, seed: int = sv.HELDOUT_SEED,
             keep: KeepFn | None = None, batch: int = 16, split: str = "standard",
             start: int = 0) -> dict:
    """Accuracy overall and per question type on ``num`` held-out questions from image
    ``start`` on; greedy first token against the answer."""
    pairs = list(sv.iter_questions(seed, num, start=start, split=split))
    correct = collections.Counter()
    total = collections.Counter()
    for first in range(0, num, batch):
        chunk = pairs[first:first + batch]
        feats = image_features(model, pixel_values([im for im, _ in chunk]).to(model.device))
        kept = []
        for i, f in enumerate(feats):
            idx = (keep(f, first + i) if keep is not None
                   else torch.arange(f.shape[0], device=f.device))
            kept.append(f[idx])
        logits = next_token_logits(model, tokenizer, [qa.question for _, qa in chunk], kept)
        preds = tokenizer.batch_decode(logits.argmax(-1)[:, None])
        for (_, qa), pred in zip(chunk, preds):
            total[qa.qtype] += 1
            correct[qa.qtype] += int(pred.strip() == qa.answer)
    per_type = {t: correct[t] / total[t] for t in total}
    return {"accuracy": sum(correct.values()) / num, "per_type": per_type, "num": num}


def random_keep(k: int, seed: int = 0) -> KeepFn:
    def keep(feats: torch.Tensor, item: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 100_003 + item)
        return torch.randperm(feats.shape[0], generator=g)[:k].sort().values
    return keep


def main() -> None:
    from vllm_vtprune.embedded import model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--num", type=int, default=400)
    p.add_argument("--random-keep", type=int, default=None)
    p.add_argument("--split", choices=sorted(sv.SPLITS), default="standard")
    p.add_argument("--start", type=int, default=0,
                   help=f"first held-out image (the benchmarks ask from {sv.BENCH_START})")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model or model_path())
    keep = random_keep(args.random_keep) if args.random_keep else None
    seed = sv.split_of(args.split).heldout_seed
    print(json.dumps(evaluate(model, tok, args.num, seed, keep=keep, split=args.split,
                              start=args.start), indent=2))


if __name__ == "__main__":
    main()
