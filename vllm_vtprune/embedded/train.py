"""Train the embedded ShapesVQA LLaVA-1.5 from a seed and write it in llava-hf layout.

    python -m vllm_vtprune.embedded.train --steps 3000 --out vllm_vtprune/embedded/shapes-llava

Every image carries all of its questions as one multi-turn conversation, so one vision
and prefill pass supervises several answers. Dense auxiliary targets (:class:`PatchProbe`)
align each visual token with the LLM's embeddings of the words describing it, so the
vision tower gets a signal from the first step.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch

from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded import MODEL_DIR
from vllm_vtprune.embedded.build import build_config, build_tokenizer, save_checkpoint
from vllm_vtprune.embedded.conversation import collate
from vllm_vtprune.embedded.evaluate import evaluate, image_features, random_keep


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def build_model(seed: int):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(build_config())


class PatchProbe(torch.nn.Module):
    """Dense auxiliary targets on the projector outputs (training only, never shipped).

    Each visual token is scored against the LLM's own input embeddings of the words that
    describe it: its side of the image ("left"/"right", "top"/"bottom") and, under an
    object, the object's colour and shape. Visual tokens thus start out looking like the
    question words that will ask for them, which is what the LLM's attention has to match.
    """

    def __init__(self, model, tokenizer):
        super().__init__()
        # A bound method, not a submodule: the model's parameters stay out of this module's.
        self.embed = model.get_input_embeddings
        words = list(sv.COLORS) + list(sv.SHAPES) + ["left", "right", "top", "bottom"]
        self.register_buffer("word_ids", torch.tensor(tokenizer.convert_tokens_to_ids(words)))
        grid = torch.arange(576)
        row, col = grid // 24, grid % 24
        side = torch.zeros(576, 4)
        side[:, 0], side[:, 1] = (col < 12).float(), (col >= 12).float()
        side[:, 2], side[:, 3] = (row < 12).float(), (row >= 12).float()
        self.register_buffer("side", side)
        self.features = None
        model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.features = output

    def targets(self, samples) -> torch.Tensor:
        labels = torch.stack([torch.from_numpy(sv.patch_labels(s.objects)) for s in samples])
        n_col, n_shape = len(sv.COLORS), len(sv.SHAPES)
        obj = labels > 0
        cls = (labels - 1).clamp_min(0)
        colour = torch.nn.functional.one_hot(cls % n_col, n_col) * obj[..., None]
        shape = torch.nn.functional.one_hot(cls // n_col, n_shape) * obj[..., None]
        side = self.side.expand(len(samples), -1, -1)
        return torch.cat([colour, shape, side], dim=-1).float(), obj

    def loss(self, samples) -> torch.Tensor:
        target, obj = self.targets(samples)
        words = self.embed()(self.word_ids).float()
        logits = self.features.float() @ words.T
        per = torch.nn.functional.binary_cross_entropy_with_logits(logits, target,
                                                                   reduction="none").sum(-1)
        # Objects cover few patches; weight them up so the background does not dominate.
        weights = 1.0 + 4.0 * obj.float()
        return (per * weights).sum() / weights.sum()


def curriculum(step: int, args) -> int:
    """Most objects per image at ``step``: 1, then 3, then all 6 (``--curriculum A,B``
    gives the steps where 1 -> 3 and 3 -> 6); finding one object is learnt before
    binding colour and shape among several."""
    if not args.curriculum:
        return 6
    one_until, three_until = (int(x) for x in args.curriculum.split(","))
    return 1 if step < one_until else 3 if step < three_until else 6


def object_focused_subsets(samples, keep_background: float, gen: torch.Generator):
    """Patch indices per image: every patch under an object plus a random share of the
    background. Early training on these short sequences is several times cheaper and
    makes the needle (a 2x2-patch object) easier to find; the last steps use all 576."""
    subsets = []
    for s in samples:
        labels = torch.from_numpy(sv.patch_labels(s.objects))
        keep = (labels > 0) | (torch.rand(labels.shape, generator=gen) < keep_background)
        subsets.append(keep.nonzero().flatten())
    return subsets


def subset_lm_loss(model, tok, samples, subsets, rng) -> torch.Tensor:
    """Next-token loss with each image entering the LLM as its ``subsets`` tokens."""
    from vllm_vtprune.embedded.build import IMAGE_TOKEN_ID
    from vllm_vtprune.embedded.conversation import IGNORE, pixel_values

    feats = image_features(model, pixel_values([s.image for s in samples]))
    batch = collate(tok, samples, rng, counts=[len(x) for x in subsets])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    kept = torch.cat([f[idx] for f, idx in zip(feats, subsets)])
    embeds = embeds.masked_scatter((batch["input_ids"] == IMAGE_TOKEN_ID)[..., None],
                                   kept.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds,
                                        attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.lm_head(hidden[:, :-1]).float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:],
                                             ignore_index=IGNORE)


def train(args) -> None:
    torch.set_num_threads(args.threads)
    if args.full_token_steps is None:
        args.full_token_steps = args.steps
    model = build_model(args.seed)
    if args.init:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    model.train()
    tok = build_tokenizer()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M", flush=True)
    probe = PatchProbe(model, tok)
    opt = torch.optim.AdamW(list(model.parameters()) + list(probe.parameters()), lr=args.lr,
                            betas=(0.9, 0.98), weight_decay=0.05)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    ema = None
    for step in range(args.steps):
        samples = [sv.make_sample(sv.TRAIN_SEED, args.data_offset + step * args.batch + i,
                                  questions_per_type=2, max_objects=curriculum(step, args))
                   for i in range(args.batch)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if step < args.steps - args.full_token_steps:
                subsets = object_focused_subsets(samples, args.keep_background, gen)
                loss = subset_lm_loss(model, tok, samples, subsets, rng)
            else:
                loss = model(**collate(tok, samples, rng)).loss
            aux = probe.loss(samples) if args.aux_weight else torch.zeros(())
        total = loss + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(f"step {step} loss {ema:.4f} aux {aux.item():.3f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{el / (step + 1) / args.batch * 1000:.0f} ms/sample {el / 60:.1f} min",
                  flush=True)
        if args.save_every and step and step % args.save_every == 0:
            save_checkpoint(model, args.out)
    save_checkpoint(model, args.out)
    report = {"parameters": n_params, "steps": args.steps, "batch": args.batch,
              "seed": args.seed, "aux_weight": args.aux_weight, "init": args.init,
              "data_offset": args.data_offset, "keep_background": args.keep_background,
              "full_token_steps": args.full_token_steps, "curriculum": args.curriculum, "train_minutes": (time.time() - t0) / 60}
    model.eval()
    report["heldout"] = evaluate(model, tok, args.eval_num)
    report["heldout_random64"] = evaluate(model, tok, args.eval_num, keep=random_keep(64))
    print(json.dumps(report, indent=2), flush=True)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--aux-weight", type=float, default=0.5)
    p.add_argument("--init", default=None, help="start from this checkpoint directory")
    p.add_argument("--data-offset", type=int, default=0, help="first training image index")
    p.add_argument("--keep-background", type=float, default=0.15)
    p.add_argument("--curriculum", default=None, help="A,B: 1 object until step A, 3 until B")
    p.add_argument("--full-token-steps", type=int, default=None,
                   help="final steps on all 576 tokens (default: all steps)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--eval-num", type=int, default=400)
    p.add_argument("--out", type=Path, default=MODEL_DIR)
    train(p.parse_args())


if __name__ == "__main__":
    main()
