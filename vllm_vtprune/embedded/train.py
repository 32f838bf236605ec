"""Train the embedded ShapesVQA LLaVA-1.5 from a seed and write it in llava-hf layout.

    python -m vllm_vtprune.embedded.train --out vllm_vtprune/embedded/shapes-llava

Two stages, the way LLaVA itself is built from a pretrained CLIP:

1. **Vision pretraining.** The CLIP tower and projector learn dense per-patch targets
   (:class:`PatchProbe`): the colour, shape and colour x shape pair of the object under
   each patch, whether the patch holds an object's centre, and on which side of the image
   that object lies. After this stage every visual token says what it shows; the probe is
   not shipped. The tower's position table starts from a smooth 2-D cosine basis
   (:func:`grid_positions`); with CLIP's random table alone the side of the image was
   never learnt.
2. **Visual instruction tuning.** The tower is frozen and its features are computed once
   for the whole image pool; the projector and the Llama decoder learn ShapesVQA
   conversations (all of an image's questions packed in one sequence, each turn seeing
   only the image and its own question, as when served). Most steps
   feed the LLM every object patch plus a random share of the background, which is
   several times cheaper than 576 tokens and teaches the lookup first; a growing share of
   steps uses all 576 tokens, the way the model is served.

shapes-llava v2 (``--init V1 --deepen --hard-share 0.5``) starts from the trained v1:
:func:`deepen` grows it to LLaVA-1.5's tower depth (24 layers, features from layer -2)
and a 16-layer LLM computing the same function, and both stages then go on over a pool
that mixes the standard and the hard split (``--hard-share``); training from a seed at
that depth costs several times the v1 model's 183 CPU-minutes.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import random
import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded import DEFAULT_MODEL, SMALL_MODEL, model_dir
from vllm_vtprune.embedded.build import (IMAGE_TOKEN_ID, V2_TEXT_LAYERS, V2_VISION_LAYERS,
                                         build_config, build_tokenizer, save_checkpoint,
                                         vocabulary)
from vllm_vtprune.embedded.conversation import IGNORE, collate, normalise
from vllm_vtprune.embedded.evaluate import evaluate, random_keep

GRID = sv.IMAGE_SIZE // sv.PATCH
NUM_PATCHES = GRID * GRID
MIN_COVER = 0.1  # share of a patch an object must cover to count as under it
# what the patch probe names: the questioned shapes, then the hard split's distractors
PROBE_SHAPES = sv.SHAPES + sv.DISTRACTOR_SHAPES


# ---------------------------------------------------------------------------------------
# Image pool
# ---------------------------------------------------------------------------------------

@dataclass
class Pool:
    """Rendered training images (uint8 HWC), their objects, questions and patch targets."""

    images: np.ndarray
    objects: list  # the questioned objects (distractors are only in the targets)
    qas: list
    colour: torch.Tensor  # [N, 576] 0 = background, else 1 + colour index
    shape: torch.Tensor   # [N, 576] 0 = background, else 1 + shape index
    centre: torch.Tensor  # [N, 576] 1 where an object's centre lies
    side: torch.Tensor    # [N, 576, 2] object centre left of / above the midline (-1: none)
    touched: torch.Tensor  # [N, 576] any object pixel in the patch

    def __len__(self) -> int:
        return len(self.objects)

    @cached_property
    def few_objects(self) -> torch.Tensor:
        """Indices of the images with at most 3 objects."""
        return torch.tensor([i for i, o in enumerate(self.objects) if len(o) <= 3])


def object_coverage(objs) -> np.ndarray:
    """Share of each 14x14 patch covered by each object, [num_objects, 576]."""
    from PIL import Image, ImageDraw

    out = np.zeros((len(objs), NUM_PATCHES), dtype=np.float32)
    for i, o in enumerate(objs):
        canvas = Image.new("L", (sv.IMAGE_SIZE, sv.IMAGE_SIZE), 0)
        sv.draw_shape(ImageDraw.Draw(canvas), o, 1)
        mask = np.asarray(canvas, dtype=np.float32)
        out[i] = mask.reshape(GRID, sv.PATCH, GRID, sv.PATCH).mean(axis=(1, 3)).reshape(-1)
    return out


def patch_targets(objs, distractors=()) -> dict[str, np.ndarray]:
    """Dense per-patch targets of one image (see :class:`Pool`). A distractor's patches
    get its colour and its own shape class, but no centre (it is never counted) and no
    side."""
    colours, n = list(sv.COLORS), NUM_PATCHES
    colour, shape = np.zeros(n, np.int64), np.zeros(n, np.int64)
    centre, side = np.zeros(n, np.float32), np.full((n, 2), -1.0, np.float32)
    touched = np.zeros(n, bool)
    everything = list(objs) + list(distractors)
    if everything:
        cover = object_coverage(everything)
        touched = cover.max(0) > 0
        best = cover.argmax(0)
        under = cover.max(0) >= MIN_COVER
        mid = sv.IMAGE_SIZE / 2
        for i, o in enumerate(everything):
            mine = under & (best == i)
            colour[mine] = 1 + colours.index(o.color)
            shape[mine] = 1 + PROBE_SHAPES.index(o.shape)
            if i < len(objs):
                side[mine] = (float(o.cx < mid), float(o.cy < mid))
                centre[(o.cy // sv.PATCH) * GRID + o.cx // sv.PATCH] = 1.0
    return dict(colour=colour, shape=shape, centre=centre, side=side, touched=touched)


QUESTIONS_PER_TYPE = 3


def training_questions(index: int, exist_questions: int, split: str = "standard",
                       caps: dict[str, int] | None = None) -> tuple:
    """Image ``index`` of ``split``'s training images with up to 3 questions of each type,
    and up to ``exist_questions`` existence questions: binding colour to shape is learnt
    last, so it gets more of the signal. ``caps`` raises (or lowers) a type's limit, to
    give the types a model is weakest at more of the signal."""
    limits = {"exist": exist_questions, **(caps or {})}
    s = sv.make_sample(sv.split_of(split).train_seed, index,
                       questions_per_type=max(QUESTIONS_PER_TYPE, *limits.values()), split=split)
    limit = lambda qa: limits.get(qa.qtype, QUESTIONS_PER_TYPE)  # noqa: E731
    seen: dict[str, int] = {}
    qas = []
    for qa in s.qas:
        seen[qa.qtype] = seen.get(qa.qtype, 0) + 1
        if seen[qa.qtype] <= limit(qa):
            qas.append(qa)
    return s, qas


def _render(job: tuple[str, int], exist_questions: int, caps: dict[str, int]) -> tuple:
    split, index = job
    s, qas = training_questions(index, exist_questions, split, caps)
    return (np.asarray(s.image, dtype=np.uint8), s.objects, qas,
            patch_targets(s.objects, s.distractors))


def pool_jobs(num: int, offset: int, hard_share: float) -> list[tuple[str, int]]:
    """(split, index) of each pool image: training images ``offset ..`` of each split, the
    hard ones spread evenly through the pool."""
    hard = round(num * hard_share)
    jobs, taken = [], {"standard": 0, "hard": 0}
    for i in range(num):
        split = "hard" if (i + 1) * hard // num > i * hard // num else "standard"
        jobs.append((split, offset + taken[split]))
        taken[split] += 1
    return jobs


def render_pool(num: int, offset: int, workers: int, exist_questions: int,
                hard_share: float = 0.0, caps: dict[str, int] | None = None) -> Pool:
    """Render ``num`` training images from index ``offset`` on (see :func:`pool_jobs`)."""
    render = functools.partial(_render, exist_questions=exist_questions, caps=caps or {})
    with multiprocessing.get_context("fork").Pool(workers) as p:
        rows = p.map(render, pool_jobs(num, offset, hard_share), chunksize=64)
    stack = lambda key: torch.from_numpy(np.stack([r[3][key] for r in rows]))  # noqa: E731
    return Pool(np.stack([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows],
                stack("colour"), stack("shape"), stack("centre"), stack("side"),
                stack("touched"))


# ---------------------------------------------------------------------------------------
# Model pieces
# ---------------------------------------------------------------------------------------

def grid_positions(dim: int, grid: int = GRID) -> torch.Tensor:
    """Smooth 2-D position table for the CLIP tower, [1 + grid * grid, dim] (CLS row 0).

    The first dim / 4 dimensions are a cosine basis of the patch column,
    cos(pi k (c + 1/2) / grid) for k = 1 .. dim / 4, the next dim / 4 the same of the row,
    the rest zero (left to CLIP's learnt table). The column's k = 1 term changes sign
    at the midline, so "which side of the image" is one linear feature; CLIP's random
    per-position table leaves that a 576-point lookup the small tower never learnt.
    """
    k = torch.arange(1, dim // 4 + 1, dtype=torch.float32)
    centres = torch.arange(grid, dtype=torch.float32) + 0.5
    basis = torch.cos(math.pi * centres[:, None] * k[None] / grid)  # [grid, dim/4]
    rows = basis[:, None, :].expand(grid, grid, -1)
    cols = basis[None, :, :].expand(grid, grid, -1)
    table = torch.cat([cols, rows], dim=-1).reshape(grid * grid, -1)
    out = torch.zeros(1 + grid * grid, dim)
    out[1:, : table.shape[1]] = table
    return out


def add_grid_positions(model, scale: float) -> None:
    """Add ``scale`` x :func:`grid_positions` to the tower's position embedding."""
    emb = model.model.vision_tower.embeddings.position_embedding
    with torch.no_grad():
        emb.weight += scale * grid_positions(emb.weight.shape[1]).to(emb.weight.dtype)


def build_model(seed: int, grid_scale: float):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config())
    add_grid_positions(model, grid_scale)
    return model


def _net2deeper(old_layers, new_layers, used_old: int, used_new: int, zero_output) -> None:
    """Fill ``new_layers`` from ``old_layers``: the first ``used_old`` old layers spread
    over the first ``used_new`` new ones, each followed by copies of itself whose output
    projections are zeroed (so they add nothing to the residual stream), and the rest
    copied one to one."""
    for j in range(len(new_layers)):
        if j < used_new:
            i = j * used_old // used_new
            first = j == -(-i * used_new // used_old)  # the first new layer mapped to i
        else:
            i, first = used_old + (j - used_new), True
        new_layers[j].load_state_dict(old_layers[i].state_dict())
        if not first:
            zero_output(new_layers[j])


def deepen(model, vision_layers: int = V2_VISION_LAYERS, text_layers: int = V2_TEXT_LAYERS):
    """A deeper LLaVA computing the same function as ``model`` (Net2DeeperNet: Chen et al.,
    "Net2Net: Accelerating Learning via Knowledge Transfer", arXiv 1511.05641, Sec. 2.2,
    with zeroed output projections as the identity layers), and the full vocabulary.

    The tower layers up to LLaVA's feature layer (-2) spread over the new tower's up to
    its -2; the LLM's layers over the new LLM's. New layers start as copies of the layer
    before them, so their attention maps are a trained layer's, not random ones. Rows of
    the new words (counts above six) start at the mean number embedding and a zero
    output row.
    """
    from transformers import LlavaForConditionalGeneration

    old_v = model.model.vision_tower.encoder.layers
    old_t = model.model.language_model.layers
    cfg = build_config(vision_layers, text_layers, len(vocabulary()))
    deep = LlavaForConditionalGeneration(cfg).to(next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items()
             if ".layers." not in k and "embed_tokens" not in k and "lm_head" not in k}
    missing = deep.load_state_dict(state, strict=False).missing_keys
    assert all(".layers." in k or "embed_tokens" in k or "lm_head" in k for k in missing)
    skip = -model.config.vision_feature_layer - 1  # tower layers after the feature layer

    def zero_clip(layer):
        for p in (layer.self_attn.out_proj, layer.mlp.fc2):
            torch.nn.init.zeros_(p.weight), torch.nn.init.zeros_(p.bias)

    def zero_llama(layer):
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)

    _net2deeper(old_v, deep.model.vision_tower.encoder.layers,
                len(old_v) - skip, vision_layers - skip, zero_clip)
    _net2deeper(old_t, deep.model.language_model.layers, len(old_t), text_layers, zero_llama)
    _grow_vocabulary(model, deep)
    return deep


@torch.no_grad()
def _grow_vocabulary(model, deep) -> None:
    old_emb, old_head = model.get_input_embeddings().weight, model.lm_head.weight
    n = old_emb.shape[0]
    numbers = [vocabulary().index(w) for w in sv.NUMBERS]
    deep.get_input_embeddings().weight[:n] = old_emb
    deep.get_input_embeddings().weight[n:] = old_emb[numbers].mean(0)
    deep.lm_head.weight[:n] = old_head
    deep.lm_head.weight[n:] = 0.0


def load_checkpoint(path: str):
    """Continue from a checkpoint this script wrote (run with ``--vision-steps 0`` to keep
    its tower, and a new ``--data-offset`` so the pool holds unseen images)."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)


def tower_features(model, pix: torch.Tensor) -> torch.Tensor:
    """CLIP hidden states at LLaVA's feature layer (-2), CLS dropped: [B, 576, 64]."""
    out = model.model.vision_tower(pix, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


class PatchProbe(torch.nn.Module):
    """Linear read-out of the projector outputs (training only, never shipped).

    Its targets make each visual token state, linearly, what the LLM will be asked about:
    colour, shape and colour x shape pair of the object under it, whether it holds that
    object's centre (one token per object, so counting objects is counting tokens), and the
    object's side.
    """

    def __init__(self, dim: int, shape_weight: float = 1.0, side_weight: float = 1.0):
        super().__init__()
        # Shape needs the object's outline, several patches away from most of its patches;
        # it is learnt last, so it gets more weight than colour.
        self.shape_weight, self.side_weight = shape_weight, side_weight
        self.n_col, self.n_shape = len(sv.COLORS) + 1, len(PROBE_SHAPES) + 1
        # The joint colour x shape class makes "is there a red circle" one feature to match,
        # where separate colour and shape features would leave the LLM to bind them.
        self.n_joint = (self.n_col - 1) * (self.n_shape - 1) + 1
        self.head = torch.nn.Linear(dim, self.n_col + self.n_shape + self.n_joint + 3)

    def split(self, feats: torch.Tensor) -> list[torch.Tensor]:
        out = self.head(feats.float())
        return out.split([self.n_col, self.n_shape, self.n_joint, 3], dim=-1)

    def loss(self, feats: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        col, shp, joint, rest = self.split(feats)
        obj = (t["colour"] > 0).float()
        # Objects cover few patches; weight them up so the background does not dominate.
        w = 1.0 + 4.0 * obj
        ce = (F.cross_entropy(col.transpose(1, 2), t["colour"], reduction="none")
              + self.shape_weight * F.cross_entropy(shp.transpose(1, 2), t["shape"],
                                                    reduction="none")
              + F.cross_entropy(joint.transpose(1, 2), joint_class(t), reduction="none"))
        weight = torch.tensor(20.0, device=feats.device)
        centre = F.binary_cross_entropy_with_logits(rest[..., 0], t["centre"], pos_weight=weight,
                                                    reduction="none")
        side = F.binary_cross_entropy_with_logits(rest[..., 1:], t["side"].clamp_min(0),
                                                  reduction="none").sum(-1) * obj
        return ((ce + centre + self.side_weight * side) * w).sum() / w.sum()

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, t: dict[str, torch.Tensor]) -> dict[str, float]:
        col, shp, joint, rest = self.split(feats)
        obj = t["colour"] > 0
        side_ok = ((rest[..., 1:] > 0).float() == t["side"])[obj]
        return {"colour": (col.argmax(-1) == t["colour"])[obj].float().mean().item(),
                "shape": (shp.argmax(-1) == t["shape"])[obj].float().mean().item(),
                "joint": (joint.argmax(-1) == joint_class(t))[obj].float().mean().item(),
                "side": side_ok.float().mean().item(),
                "centre_recall": (rest[..., 0] > 0)[t["centre"] > 0].float().mean().item()}


def joint_class(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """0 for background, else 1 + colour index x number of shapes + shape index."""
    obj = t["colour"] > 0
    joint = (t["colour"] - 1) * len(PROBE_SHAPES) + t["shape"]
    return torch.where(obj, joint, torch.zeros_like(joint))


def batch_targets(pool: Pool, idx: list[int], device="cpu") -> dict[str, torch.Tensor]:
    return {k: getattr(pool, k)[idx].to(device) for k in ("colour", "shape", "centre", "side")}


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def log(msg: str) -> None:
    import resource

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (peak memory {peak_gb:.1f} GB)", flush=True)


# ---------------------------------------------------------------------------------------
# Stage 1: vision pretraining
# ---------------------------------------------------------------------------------------

def train_vision(model, probe: PatchProbe, pool: Pool, args) -> dict:
    params = (list(model.model.vision_tower.parameters())
              + list(model.model.multi_modal_projector.parameters()) + list(probe.parameters()))
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    acc, dev = {}, device_of(model)
    for step in range(args.vision_steps):
        idx = torch.randint(len(pool), (args.vision_batch,), generator=gen).tolist()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vision_steps, args.vision_lr, 100)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            tower = tower_features(model, normalise(pool.images[idx]).to(dev))
            feats = model.model.multi_modal_projector(tower)
            t = batch_targets(pool, idx, dev)
            loss = probe.loss(feats, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.vision_steps - 1:
            acc = probe.accuracy(feats, t)
            log(f"vision step {step} loss {loss.item():.4f} " +
                " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return acc


@torch.no_grad()
def cache_tower_features(model, pool: Pool, batch: int = 64) -> torch.Tensor:
    out, dev = [], device_of(model)
    for start in range(0, len(pool), batch):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            images = normalise(pool.images[start:start + batch]).to(dev)
            out.append(tower_features(model, images).bfloat16())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------
# Stage 2: visual instruction tuning on cached tower features
# ---------------------------------------------------------------------------------------

def background_share(step: int, args, rng: random.Random) -> float:
    """Share of background patches a step feeds the LLM: few early (cheap steps that make
    the lookup easy to find), then increasingly often all of them (as served)."""
    progress = step / max(1, args.llm_steps)
    if rng.random() < args.full_share * progress:
        return 1.0
    return rng.uniform(0.02, 0.3)


def kept_patches(pool: Pool, i: int, share: float, gen: torch.Generator) -> torch.Tensor:
    """Every patch an object touches plus ``share`` of the others, in original order."""
    if share >= 1.0:
        return torch.arange(NUM_PATCHES)
    keep = pool.touched[i] | (torch.rand(NUM_PATCHES, generator=gen) < share)
    return keep.nonzero().flatten()


def lm_loss(model, tok, pool: Pool, feats: torch.Tensor, idx: list[int], share: float,
            rng: random.Random, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss on answers, each image entering the LLM as its kept patches."""
    keep = [kept_patches(pool, i, share, gen) for i in idx]
    input_ids, mask, positions, labels = (x.to(feats.device) for x in collate(
        tok, [pool.qas[i] for i in idx], [len(k) for k in keep], rng))
    visual = model.model.multi_modal_projector(feats[idx].float())
    embeds = model.get_input_embeddings()(input_ids)
    kept = torch.cat([v[k] for v, k in zip(visual, keep)])
    embeds = embeds.masked_scatter((input_ids == IMAGE_TOKEN_ID)[..., None], kept.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=positions).last_hidden_state
    logits = model.lm_head(hidden[:, :-1]).float()
    loss = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE)
    return loss, visual


def easy_first(pool: Pool, step: int, args, gen: torch.Generator) -> list[int]:
    """Batch indices; the first ``--easy-steps`` draw only images with at most 3 objects,
    so finding one object is learnt before binding colour and shape among six."""
    if step < args.easy_steps:
        few = pool.few_objects
        return few[torch.randint(len(few), (args.batch,), generator=gen)].tolist()
    return torch.randint(len(pool), (args.batch,), generator=gen).tolist()


def train_language(model, probe: PatchProbe, tok, pool: Pool, feats: torch.Tensor, args) -> None:
    model.model.vision_tower.requires_grad_(False)
    params = (list(model.model.multi_modal_projector.parameters())
              + list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
              + list(probe.parameters()))
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ema, t0, dev = None, time.time(), device_of(model)
    for step in range(args.llm_steps):
        idx = easy_first(pool, step, args, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.llm_steps, args.lr, args.warmup)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss, visual = lm_loss(model, tok, pool, feats, idx, background_share(step, args, rng),
                                   rng, gen)
            aux = (probe.loss(visual, batch_targets(pool, idx, dev)) if args.aux_weight
                   else torch.zeros((), device=dev))
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.llm_steps - 1:
            el = time.time() - t0
            log(f"llm step {step} loss {ema:.4f} aux {aux.item():.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {el / (step + 1) * 1000:.0f} ms/step")
        if args.eval_every and step and step % args.eval_every == 0:
            model.eval()
            log(f"llm step {step} heldout {json.dumps(evaluate(model, tok, 100))}")
            model.train()
        if args.save_every and step and step % args.save_every == 0:
            save_checkpoint(model, args.out)


def train(args) -> None:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.init:
        model = load_checkpoint(args.init)
        if args.add_grid_positions:
            add_grid_positions(model, args.grid_scale)
        if args.deepen:
            model = deepen(model)
    else:
        model = build_model(args.seed, args.grid_scale)
    model.to(args.device).train()
    tok = build_tokenizer(model.config.text_config.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params / 1e6:.2f}M; rendering {args.pool} images")
    pool = render_pool(args.pool, args.data_offset, args.threads, args.exist_questions,
                       args.hard_share, dict(args.type_cap))
    log("pool rendered")
    probe = PatchProbe(model.config.text_config.hidden_size, args.shape_weight,
                       args.side_weight).to(args.device)
    vision_acc = train_vision(model, probe, pool, args)
    feats = cache_tower_features(model, pool)
    log("tower features cached")
    train_language(model, probe, tok, pool, feats, args)
    minutes = (time.time() - t0) / 60
    save_checkpoint(model, args.out)
    model.eval()
    options = {k: v for k, v in vars(args).items() if k not in ("out", "command", "threads")}
    report = {"parameters": n_params, "command": args.command, "options": options,
              "vision_probe_accuracy": vision_acc, "train_minutes": round(minutes, 1),
              **heldout_report(model, tok, args.eval_num, args.hard_share > 0)}
    print(json.dumps(report, indent=2), flush=True)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


def heldout_report(model, tok, num: int, hard: bool) -> dict:
    """Held-out accuracy with all 576 tokens and with a random 64, per split."""
    out = {}
    for split in ("standard", "hard") if hard else ("standard",):
        suffix = "" if split == "standard" else "_hard"
        seed = sv.split_of(split).heldout_seed
        out["heldout" + suffix] = evaluate(model, tok, num, seed, split=split)
        out["heldout_random64" + suffix] = evaluate(model, tok, num, seed, keep=random_keep(64),
                                                    split=split)
    return out


def _type_cap(text: str) -> tuple[str, int]:
    qtype, _, n = text.partition("=")
    known = {t for split in sv.SPLITS.values() for t in split.question_types}
    if qtype not in known or not n.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected TYPE=N with TYPE one of "
                                         f"{', '.join(sorted(known))}")
    return qtype, int(n)


def main() -> None:
    import sys
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=16000, help="training images rendered once")
    p.add_argument("--data-offset", type=int, default=0, help="first training image index")
    p.add_argument("--exist-questions", type=int, default=6,
                   help="existence questions per image (other types: 3)")
    p.add_argument("--type-cap", type=_type_cap, action="append", default=[],
                   metavar="TYPE=N", help="questions of TYPE per training image (default 3, "
                   "exist: --exist-questions); repeatable")
    p.add_argument("--vision-steps", type=int, default=1400)
    p.add_argument("--vision-batch", type=int, default=32)
    p.add_argument("--vision-lr", type=float, default=3e-3)
    p.add_argument("--shape-weight", type=float, default=2.0)
    p.add_argument("--side-weight", type=float, default=3.0)
    p.add_argument("--grid-scale", type=float, default=5.0,
                   help="amplitude of the 2-D cosine position table added to CLIP's")
    p.add_argument("--add-grid-positions", action="store_true",
                   help="with --init: add the 2-D position table to the checkpoint's tower")
    p.add_argument("--deepen", action="store_true",
                   help=f"with --init: grow to {V2_VISION_LAYERS} tower and {V2_TEXT_LAYERS} "
                   "LLM layers computing the same function (shapes-llava v2)")
    p.add_argument("--hard-share", type=float, default=0.0,
                   help="share of the pool drawn from the hard split (0: standard only)")
    p.add_argument("--llm-steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--easy-steps", type=int, default=300)
    p.add_argument("--full-share", type=float, default=0.5,
                   help="share of steps on all 576 tokens, reached linearly by the end")
    p.add_argument("--aux-weight", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="continue from this checkpoint directory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where to train (e.g. cuda)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--eval-num", type=int, default=400)
    p.add_argument("--out", type=Path, default=None,
                   help=f"checkpoint directory (default: the package's {DEFAULT_MODEL} with "
                        f"--deepen, else --init's directory, else {SMALL_MODEL})")
    args = p.parse_args()
    if args.add_grid_positions and not args.init:
        p.error("--add-grid-positions needs --init (a model built from seed always has the table)")
    if args.deepen and not args.init:
        p.error("--deepen needs --init (the checkpoint to grow)")
    if args.out is None:
        args.out = (model_dir(DEFAULT_MODEL) if args.deepen else
                    Path(args.init) if args.init else model_dir(SMALL_MODEL))
    args.command = "python -m vllm_vtprune.embedded.train " + " ".join(sys.argv[1:])
    train(args)


if __name__ == "__main__":
    main()
