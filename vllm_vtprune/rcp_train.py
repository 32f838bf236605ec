"""Train RCP's plug-in modules (pruners and repair adapters) on a frozen LLaVA.

    python -m vllm_vtprune.rcp_train --budget 128 --steps 600 --out rcp-128.safetensors
    python -m vllm_vtprune.rcp_train --model PATH --data records.jsonl --budget 128 ...

Implements the training of Zhang et al., "RCP: Representation Consistency Pruner for
Mitigating Distribution Shift in Large Vision-Language Models" (arXiv 2604.04972),
Sec. III-D, on the transformers model (every backbone weight frozen):

* masks (default, not in the paper): Eq. 6's noisy logits keep exactly the count the
  budget serves at each pruning layer (:func:`vllm_vtprune.methods.rcp.gumbel_topk_mask`,
  counts from :func:`vllm_vtprune.methods.rcp.planned_counts`), straight-through with a
  sigmoid around the k-th logit, the temperature annealed from 1.5 to 0.2 and the noise
  faded out over the last steps (:func:`noise_scale`); the sparsity term is then
  reported, not optimised. ``--threshold-masks``: the paper's Gumbel-sigmoid masks
  (Eqs. 6-7, threshold at 0) with the sparsity loss, whose pruners here drifted away
  from the budget (to keeping most tokens on shapes-llava v2, a third of it on v1). In
  both, masks are cumulative over the pruning layers and a pruned
  visual token is removed from every later query's attention by renormalising the
  softmax over the kept keys (exact masking in the forward pass, differentiable in the
  mask);
* losses (Eq. 22): ``1.5 * task + 40 * repair + 200 * sparsity``; task: next-token
  cross-entropy on the answer (teacher forcing); repair (Eqs. 16-18): the answer
  region's hidden states after each repair layer against the full-token teacher's;
  sparsity (Eqs. 19-21): |layer-averaged retention - r*|, r* = budget / N;
  ``--repair-weight`` replaces the 40 (on shapes-llava v2 the repair term outweighs the
  task ~250-fold at 40 and drove the pruners to background tokens; ``--freeze-pruners``
  trains the adapters alone);
* initialisation (threshold masks; not in the paper): the pruners' biases are calibrated on 16 samples
  so that their threshold masks start at the budget (:func:`calibrate_biases`); r* is
  then the target from the first step (the paper anneals it from 1 over early training,
  which here first taught the pruners to keep everything; ``--no-calibrate`` restores
  the paper's start); ``--init`` resumes from a checkpoint, at the target;
* distillation (``--distill-weight``, not in the paper): each pruner's softmax over the
  live tokens against the full-token teacher's answer-row attention from its layer on
  (:func:`distill_loss`); ``--distill-only`` makes it the pruners' only gradient (the
  adapters keep Eq. 22's terms). A checkpoint's report (``<out>.json``) records the
  settings it trained with; the README gives the embedded model's recipe;
* 16 pruning queries, query dropout 0.2 (the module defaults); S_q aggregated in Eq.
  4's logit space (``--query-score log``, the default) or as Eq. 2's softmax weights
  (``softmax``; why the default departs from it, and what each measured:
  ``vllm_vtprune.methods.rcp``).

``--device cuda`` trains on a GPU (the model in float32 there too; the checkpoint's
tensors are written from the CPU, and the report's held-out accuracy is measured on the
device). Data: ShapesVQA's training split for the embedded model (default), or a JSONL file of
``{"image": PATH, "question": TEXT, "answer": TEXT}`` records (image paths relative to
the file). Deterministic from ``--seed``; ``--init CKPT`` resumes from a checkpoint (its
report's step count continues). Writes the checkpoint (safetensors, see
:func:`vllm_vtprune.methods.rcp.save_checkpoint`) and ``<out>.json``: lineage, losses,
kept fraction per layer and held-out accuracy through the reference loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from vllm_vtprune.embedded.conversation import user_turn
from vllm_vtprune.methods import rcp

TASK_WEIGHT, REPAIR_WEIGHT, SPARSE_WEIGHT = 1.5, 40.0, 200.0
TAU_START, TAU_END = 1.5, 0.2
NOISE_FLAT, NOISE_END = 0.6, 0.9  # Eq. 6's noise: full until, zero from (share of steps)
TARGET_WARMUP = 0.3  # share of the steps over which r* goes from 1 to budget / N


@dataclasses.dataclass
class Sample:
    image: object  # PIL image
    question: str
    answer: str


@dataclasses.dataclass
class Encoded:
    """One teacher-forced sequence: prompt (with every visual token) then answer."""

    embeds: Tensor  # [T, d]
    targets: Tensor  # [A] answer ids and EOS
    visual: Tensor  # [N] rows of the visual tokens
    question: Tensor  # [Lq] prompt rows after the last image (what the pruners read)
    answer: Tensor  # [A] rows whose next token is an answer token (last prompt row on)


# ------------------------------------------------------------------ data
def shapes_samples(seed: int | None, num: int, start: int = 0,
                   split: str = "standard", heldout: bool = False) -> list[Sample]:
    """``num`` ShapesVQA questions of ``split`` (``both``: the standard and the hard
    split in turns, as shapes-llava v2 was trained); ``seed`` None: the split's own
    training (or, with ``heldout``, held-out) seed."""
    from vllm_vtprune.data import shapes_vqa as sv

    if split == "both":
        halves = [shapes_samples(seed, n, start, name, heldout)
                  for name, n in (("standard", num - num // 2), ("hard", num // 2))]
        return [s for pair in itertools.zip_longest(*halves) for s in pair if s is not None]
    chosen = sv.split_of(split)
    if seed is None:
        seed = chosen.heldout_seed if heldout else chosen.train_seed
    return [Sample(im, qa.question, qa.answer)
            for im, qa in sv.iter_questions(seed, num, start, split=chosen)]


def jsonl_samples(path: str) -> list[Sample]:
    """``{"image", "question", "answer"}`` records; a bad record names its line."""
    from PIL import Image

    out, root = [], os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image = Image.open(os.path.join(root, rec["image"])).convert("RGB")
                out.append(Sample(image, str(rec["question"]), str(rec["answer"])))
            except (ValueError, KeyError, OSError) as err:
                raise ValueError(f"{path}:{n}: not an {{image, question, answer}} record "
                                 f"with a readable image ({err})") from None
    if not out:
        raise ValueError(f"{path}: no records")
    return out


@torch.no_grad()
def encode(reference, sample: Sample) -> Encoded:
    from vllm_vtprune.hf import _expand

    tok = reference.tokenizer
    prompt = tok(user_turn(sample.question)).input_ids
    image = reference.image_tokens(reference.pixel_values([sample.image]), None, prompt)[0]
    ids = _expand(prompt, reference.image_token_id, [image.tokens.shape[0]])
    answer = tok(sample.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    dev = reference.device
    rows = torch.tensor(ids, device=dev)
    visual = torch.nonzero(rows == reference.image_token_id).flatten()
    full = ids + answer[:-1]
    embeds = reference.prompt_embeds(full, image.tokens)
    question = torch.arange(int(visual[-1]) + 1, len(ids), device=dev)
    return Encoded(embeds, torch.tensor(answer, device=dev), visual, question,
                   torch.arange(len(ids) - 1, len(full), device=dev))


# ------------------------------------------------------------------ the pruned forward
class MaskedForward:
    """The frozen decoder with RCP's modules, layer by layer (gpt-fast style): pruners
    before their layers set a differentiable keep mask over the visual keys, adapters
    after theirs act on the answer rows."""

    def __init__(self, reference):
        self.lm = reference.model.model.language_model
        self.lm_head = reference.model.lm_head
        cfg = self.lm.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)

    def layer(self, i: int, x: Tensor, positions: Tensor, keep: Tensor | None):
        """Decoder layer ``i``; ``keep`` [T] weights the keys (1: kept, 0: pruned)."""
        from vllm_vtprune.llm_loop import attention_inputs

        layer = self.lm.layers[i]
        attn = layer.self_attn
        t = x.shape[0]
        q, k, v = attention_inputs(self.lm, i, x, positions, self.heads, self.kv_heads,
                                   self.head_dim)
        rep = self.heads // self.kv_heads
        k, v = k[0].repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scores = (q[0] @ k.transpose(1, 2)) * attn.scaling
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")).float(), dim=-1)
        if keep is not None:  # exact masking forward, differentiable in ``keep``
            own = torch.eye(t, dtype=probs.dtype, device=probs.device)  # sees itself
            weights = torch.maximum(keep[None, :].expand(t, t), own)
            probs = probs * weights
            # a row whose kept keys all underflowed would divide 0 by 0
            probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)
        out = (probs.to(v.dtype) @ v).transpose(0, 1).reshape(t, -1)
        x = x + attn.o_proj(out)
        return x + layer.mlp(layer.post_attention_layernorm(x)), probs

    def __call__(self, enc: Encoded, modules: rcp.RcpModules | None, tau: float,
                 hard: bool = False, noise: float = 1.0):
        """Logits at the answer rows, the answer rows' hidden states after each repair
        layer, and the cumulative keep mask of each pruning layer. With ``attention`` a
        list, each layer's :func:`answer_attention` is appended to it; with ``scored`` a
        dict, each pruner's logits and the live tokens it scored go there."""
        self._modules = modules
        x = enc.embeds
        t = x.shape[0]
        dev = x.device
        positions = torch.arange(t, device=dev)
        n = len(enc.visual)
        mask = torch.ones(n, device=dev)
        masks, hidden, probs = {}, {}, None
        keep = None
        pruned_sum = torch.zeros(x.shape[1], device=dev)
        pruned_count = torch.zeros((), device=dev)
        layers = modules.num_layers if modules is not None else len(self.lm.layers)
        for i in range(layers):
            if modules is not None and i in modules.pruners:
                new = self._prune(modules.pruners[i], x, probs, enc, mask, tau, hard, noise)
                dropped = mask - new
                pruned_sum = pruned_sum + (dropped[:, None] * x[enc.visual].float()).sum(0)
                pruned_count = pruned_count + dropped.sum()
                mask = masks[i] = new
                keep = torch.ones(t, device=dev).index_put((enc.visual,), mask)
            x, probs = self.layer(i, x, positions, keep)
            if self.attention is not None:
                self.attention.append(answer_attention(probs, enc))
            if modules is not None and i in modules.adapters:
                x = self._repair(modules, i, x, enc, mask, pruned_sum, pruned_count)
            if modules is not None and i in modules.adapters or (
                    modules is None and i in self.repair_layers):
                hidden[i] = x[enc.answer]
        logits = self.lm_head(self.lm.norm(x[enc.answer]))
        return logits, hidden, masks

    repair_layers: tuple[int, ...] = ()

    #: when a dict, the pruners' logits of the live tokens are appended per layer
    record: dict | None = None

    #: tokens kept after each pruning layer (rcp.RcpModules.plan), or None: Eq. 6-7's
    #: threshold masks
    counts: dict[int, int] | None = None

    #: when a list, each layer's answer_attention (the teacher's, for the distillation term)
    attention: list | None = None

    #: when a dict, {pruning layer: (logits [N], live [N] bool)} of the last forward
    scored: dict | None = None

    #: masks from detached logits: the pruners get no straight-through gradient (they
    #: learn from the distillation term alone)
    cut_masks: bool = False

    @staticmethod
    def intrinsic(probs: Tensor, enc: Encoded, rows: str = rcp.INTRINSIC_ROW) -> Tensor:
        """a_i (Eq. 4) from the previous layer's attention ``probs`` [H, T, T]: the
        question rows' attention to each visual token, averaged over heads and over the
        rows (or taken at the last, ``rows="last"``)."""
        return rcp.intrinsic_attention(probs[:, enc.question][:, :, enc.visual][None].detach(),
                                       rows)[0]

    @classmethod
    def pruner_logits(cls, pruner, x: Tensor, probs: Tensor, enc: Encoded,
                      mask: Tensor | None = None) -> Tensor:
        """Eq. 5's logits of the visual rows of ``x`` (the hidden states entering the
        pruning layer), ``mask`` the cumulative keep mask so far."""
        h = x.float()
        return pruner.logits(h[enc.visual][None], h[enc.question][None],
                             cls.intrinsic(probs, enc, pruner.intrinsic_rows)[None],
                             prev_mask=None if mask is None else mask[None])[0]

    def _prune(self, pruner, x, probs, enc, mask, tau, hard, noise):
        logits = self.pruner_logits(pruner, x, probs, enc, mask)
        if self.scored is not None:
            self.scored[layer_of(self._modules, pruner)] = (logits, mask.detach() > 0.5)
        if self.record is not None:
            self.record.setdefault(layer_of(self._modules, pruner), []).append(
                logits[mask > 0.5].detach())
        if self.cut_masks:
            logits = logits.detach()
        if hard:
            m = rcp.inference_mask(logits, 1.0)
        elif self.counts is not None:
            m = rcp.gumbel_topk_mask(logits, mask, self.counts[layer_of(self._modules, pruner)],
                                     tau, noise=noise)
        else:
            m = rcp.gumbel_sigmoid_mask(logits, tau, noise=noise)
        return rcp.cumulative_mask(mask, m)

    def _repair(self, modules, i, x, enc, mask, pruned_sum, pruned_count):
        adapter = modules.adapters[i]
        positions = rcp.token_positions(len(enc.visual), adapter.mask_query.shape[0],
                                        device=x.device)
        mean = pruned_sum / pruned_count.clamp_min(1.0)
        context = adapter.mask_embedding(mask[None], positions) + adapter.pruned_proj(mean[None])
        answer = torch.zeros(x.shape[0], device=x.device).index_fill(0, enc.answer, 1.0)
        return adapter(x.float()[None], context, answer[None])[0].to(x.dtype)


def layer_of(modules: rcp.RcpModules, pruner) -> int:
    return next(l for l, p in modules.pruners.items() if p is pruner)


# ------------------------------------------------------------------ losses
def answer_attention(probs: Tensor, enc: Encoded) -> Tensor:
    """The last prompt row's attention to each visual token (the row that reads the
    image for the answer's first token), averaged over heads: [N] of [H, T, T]. It is
    a_i's ``"last"`` reading (:func:`rcp.question_attention`: the last question row is
    the last prompt row), taken here from every layer of the full-token teacher."""
    last = enc.question[-1:]
    return rcp.question_attention(probs[:, last][:, :, enc.visual][None], "last")[0]


def attention_targets(per_layer: list[Tensor], pruning_layers) -> dict[int, Tensor]:
    """Each pruning layer l's distillation target: the full-token teacher's
    :func:`answer_attention` averaged over layers l-1 (the one a_i reads) to the last,
    the tokens the answer reads from there on."""
    return {l: torch.stack(per_layer[l - 1:]).mean(0) for l in pruning_layers}


def distill_loss(logits: Tensor, live: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of the pruner's softmax over the live tokens against the teacher's
    attention renormalised over them: -sum_i p_i log softmax(z)_i, p = t / sum_live t.

    Not in the paper, whose pruners learn only through the masks' straight-through
    gradient (Eqs. 6-7, 22): on shapes-llava v2 that gradient raised the masks of kept
    background tokens (README, "Where the flat-plan RCP modules lost"), and pruners
    started at FastV's row (``intrinsic_rows="last"``) fell from FastV's accuracy to 0.42.
    This term tells each pruner which live tokens the full-token model's answer reads
    (:func:`attention_targets`); ranked so, keeping 52/16/13 tokens answers 0.925 / 0.720
    of 400 held-out standard / hard questions (FastV's rule 0.933 / 0.710), and the shipped
    modules trained with it 0.9325 / 0.7125 through vLLM (README)."""
    p = target[live].float()
    p = p / p.sum().clamp_min(1e-30)
    return -(p * torch.log_softmax(logits[live].float(), dim=-1)).sum()


def losses(student, teacher_hidden, enc: Encoded, num_layers: int, target: float,
           sparse_weight: float = SPARSE_WEIGHT, repair_weight: float = REPAIR_WEIGHT,
           distill: tuple[dict, dict] | None = None, distill_weight: float = 0.0) -> dict:
    """Eq. 22's terms for one sequence (``sparse_weight`` 0 with fixed-count masks,
    whose retention the sparsity term cannot move); with ``distill`` (the student's
    ``MaskedForward.scored`` and :func:`attention_targets`) the mean over pruning layers
    of :func:`distill_loss`, added at ``distill_weight``."""
    logits, hidden, masks = student
    task = F.cross_entropy(logits.float(), enc.targets)
    repair = rcp.repair_loss([hidden[l] for l in sorted(hidden)],
                             [teacher_hidden[l] for l in sorted(hidden)])
    sparse = rcp.sparsity_loss(masks, num_layers, len(enc.visual), target)
    total = TASK_WEIGHT * task + repair_weight * repair + sparse_weight * sparse
    out = {"task": task, "repair": repair, "sparse": sparse}
    if distill is not None:
        scored, targets = distill
        out["distill"] = torch.stack([distill_loss(*scored[l], targets[l])
                                      for l in sorted(scored)]).mean()
        total = total + distill_weight * out["distill"]
    return out | {"total": total}


def schedule(step: int, steps: int, lr: float, target: float,
             warmup: bool = True) -> tuple[float, float, float]:
    """(learning rate: cosine to 0.1x, Gumbel temperature: 1.5 -> 0.2, r*: 1 -> target
    over the first 30 % of the steps, or the target throughout without ``warmup``).
    Steps past the schedule's end hold its last values (a tail, see :func:`train`)."""
    frac = min(1.0, step / max(1, steps - 1))
    rate = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    tau = TAU_START + (TAU_END - TAU_START) * frac
    warm = min(1.0, step / max(1.0, TARGET_WARMUP * steps)) if warmup else 1.0
    return rate, tau, 1.0 + (target - 1.0) * warm


def noise_scale(step: int, steps: int) -> float:
    """Scale of Eq. 6's noise: 1 over the first 60 % of the steps, then down to 0 at 90 %.

    Not in the paper: with the noise kept to the end, training sees masks that keep a
    token with probability sigmoid(logit) while inference keeps it iff logit > 0
    (Eq. 8), and modules trained so pruned far more at inference than they were trained
    for. The noise-free last steps train the inference rule itself (and every step past
    the schedule's end: a tail).
    """
    frac = min(1.0, step / max(1, steps - 1))
    return min(1.0, max(0.0, (NOISE_END - frac) / (NOISE_END - NOISE_FLAT)))


# ------------------------------------------------------------------ training
@torch.no_grad()
def calibrate_biases(forward: MaskedForward, modules: rcp.RcpModules, encoded: list[Encoded],
                     budget: int, margin: float = 1.0,
                     live_budget: int | None = None) -> dict[int, float]:
    """Set each pruner's bias so that, on ``encoded``, its threshold mask (Eq. 8) keeps
    ``margin`` times the budget's planned count at the first pruning layer
    (:meth:`rcp.RcpModules.plan`) and ``margin`` times the modules' later share of the live
    tokens at each later one (:attr:`rcp.RcpModules.later_shares`), layer after layer.
    The later layers' live tokens are those the thresholds leave, or with ``live_budget``
    those the fixed-count masks of that budget leave (:meth:`rcp.RcpModules.plan`, no
    noise).

    Not in the paper: with the bias at 0 the pruners start by keeping almost every token
    at the first pruning layer, where the straight-through gradient of a saturated
    sigmoid cannot bring the sparsity loss down in a short training (``margin`` 1, before
    training). After training (:func:`calibrate_for_serving`) a margin above 1 leaves the
    count to the served ceiling and the choice to the learned logits.
    """
    n = len(encoded[0].visual)
    layers = modules.pruning_layers
    first = modules.plan(n, budget)[layers[0]]
    out = {}
    for s, layer in enumerate(layers):
        forward.record = {}
        for enc in encoded:
            if s > 0 and live_budget is not None:
                forward.counts = modules.plan(len(enc.visual), live_budget)
                forward(enc, modules, 1.0, noise=0.0)
                forward.counts = None
            else:
                forward(enc, modules, 1.0, hard=True)
        logits = torch.cat(forward.record[layer])
        keep = min(1.0, margin * (first / n if s == 0 else modules.later_shares[s - 1]))
        pruner = modules.pruners[layer]
        shift = -float(torch.quantile(logits - pruner.bias, 1.0 - keep))
        pruner.bias.fill_(shift)
        out[layer] = shift
    forward.record = None
    return out


#: after training, each pruning layer's threshold keeps this many times the planned
#: count of the largest budget served (:func:`calibrate_for_serving`)
SERVING_MARGIN = 2.0


def calibrate_for_serving(reference, modules: rcp.RcpModules, samples: list[Sample],
                          budget: int, trained_budget: int) -> dict[int, float]:
    """Biases for serving ``rcp:K``, K up to ``budget``: each threshold keeps twice the
    planned count (:meth:`rcp.RcpModules.plan`; at later layers twice
    the modules' later share of the tokens live there at ``trained_budget``, the counts the
    modules trained with), so the plan sets the count and the trained logits choose the
    tokens.

    Not in the paper, where the threshold alone sets the count. Measured on the embedded
    models: trained thresholds keep well under the budget at inference (Eq. 6's noise and
    the annealed temperature train a looser rule than Eq. 8's), which costs accuracy the
    budget allowed; and later layers calibrated on the threshold's own (much larger)
    live set kept half of the trained count there.
    """
    forward = MaskedForward(reference)
    forward.repair_layers = tuple(sorted(modules.adapters))
    encoded = [encode(reference, s) for s in samples]
    modules.train(False)
    return calibrate_biases(forward, modules, encoded, budget, margin=SERVING_MARGIN,
                            live_budget=trained_budget)


def train(reference, modules: rcp.RcpModules, samples: list[Sample], *, steps: int,
          batch: int, lr: float, budget: int, seed: int, log=print,
          calibrate: bool = True, warmup: bool | None = None, first_step: int = 0,
          total_steps: int | None = None, fixed_count: bool = True,
          repair_weight: float = REPAIR_WEIGHT, distill_weight: float = 0.0,
          distill_only: bool = False) -> list[dict]:
    """Optimise ``modules`` in place for ``steps`` steps; returns the per-step mean losses.

    A run split into chunks passes each chunk's ``first_step`` and the whole run's
    ``total_steps``: the schedules (learning rate, temperature, noise, r*) and the
    sample order are those of step ``first_step + i`` of the whole run, so chunks
    follow the one run's schedule (AdamW's moments restart with each chunk). A chunk
    that goes past ``total_steps`` is a tail: its steps there hold the schedules' last
    values (the temperature at its end, no noise: the inference rule), at ``lr`` times
    the cosine's floor of 0.1.

    ``fixed_count`` (default): masks keep the served count (:func:`rcp.gumbel_topk_mask`,
    :meth:`rcp.RcpModules.plan`) and the sparsity term is reported, not optimised;
    False: the paper's threshold masks (Eqs. 6-7) with the sparsity loss.
    ``distill_weight`` above 0 adds :func:`distill_loss` (not in the paper) at that weight;
    ``distill_only`` makes it the pruners' only teacher (their masks pass no
    straight-through gradient; the adapters still learn from the task and repair terms).
    """
    if distill_only and not distill_weight:
        raise ValueError("distill_only needs a distill_weight above 0")
    total_steps = total_steps or first_step + steps
    for p in reference.model.parameters():
        p.requires_grad_(False)
    forward = MaskedForward(reference)
    forward.repair_layers = tuple(sorted(modules.adapters))
    forward.cut_masks = distill_only
    torch.manual_seed(seed + first_step)
    order = random.Random(f"{seed}:{first_step}")
    if calibrate and not fixed_count:  # a bias does not move a top-k
        biases = calibrate_biases(forward, modules, [encode(reference, samples[i]) for i in
                                                     range(min(16, len(samples)))], budget)
        log(f"calibrated pruner biases: {biases}")
    opt = torch.optim.AdamW([p for p in modules.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    history = []
    modules.train(True)
    started = time.time()
    for step in range(first_step, first_step + steps):
        # calibrated pruners start at the budget: the dense-to-sparse warm-up of r* would
        # first teach them to keep everything
        rate, tau, target = schedule(step, total_steps, lr, budget_fraction(budget, reference),
                                     warmup=not calibrate if warmup is None else warmup)
        noise = noise_scale(step, total_steps)
        for group in opt.param_groups:
            group["lr"] = rate
        opt.zero_grad()
        sums = {}
        for _ in range(batch):
            enc = encode(reference, samples[order.randrange(len(samples))])
            forward.counts = modules.plan(len(enc.visual), budget) if fixed_count else None
            forward.attention = [] if distill_weight else None
            with torch.no_grad():
                _, teacher, _ = forward(enc, None, tau)
            distill = None
            if distill_weight:
                targets = attention_targets(forward.attention, modules.pruning_layers)
                forward.attention, forward.scored = None, {}
                distill = (forward.scored, targets)
            student = forward(enc, modules, tau, noise=noise)
            forward.scored = None
            terms = losses(student, teacher, enc, modules.num_layers, target,
                           sparse_weight=0.0 if fixed_count else SPARSE_WEIGHT,
                           repair_weight=repair_weight, distill=distill,
                           distill_weight=distill_weight)
            (terms["total"] / batch).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / batch
        opt.step()
        history.append({"step": step, "tau": round(tau, 4), "noise": round(noise, 4),
                        "target": round(target, 4), **sums})
        if step % 10 == 0 or step == first_step + steps - 1:
            log(f"step {step + 1}/{total_steps} total {sums['total']:.4f} task {sums['task']:.4f} "
                f"repair {sums['repair']:.5f} sparse {sums['sparse']:.4f} "
                f"distill {sums.get('distill', 0.0):.4f} tau {tau:.2f} "
                f"noise {noise:.2f} "
                f"({time.time() - started:.0f} s)")
    modules.train(False)
    return history


def budget_fraction(budget: int, reference) -> float:
    rows, cols = reference.tower.grid
    return min(1.0, budget / (rows * cols))


@torch.no_grad()
def evaluate(reference, ckpt: str, budget: int, samples: list[Sample]) -> dict:
    """Held-out accuracy through the reference loop (rows removed), unpruned accuracy,
    and each decoder layer's kept visual fraction."""
    from vllm_vtprune import spec as spec_mod

    spec = spec_mod.parse(f"rcp:{budget},ckpt={ckpt}")
    right = full = 0
    kept = None
    for s in samples:
        prompt = user_turn(s.question)
        right += reference.generate(prompt, [s.image], spec)[0].strip() == s.answer
        full += reference.generate(prompt, [s.image], None)[0].strip() == s.answer
        fractions = _kept_fractions(reference, prompt, s.image, spec)
        kept = fractions if kept is None else [a + b for a, b in zip(kept, fractions)]
    n = len(samples)
    return {"questions": n, "accuracy": right / n, "full_accuracy": full / n,
            "kept_fraction_per_layer": [round(k / n, 4) for k in kept]}


def _kept_fractions(reference, prompt, image, spec) -> list[float]:
    from vllm_vtprune.hf import _expand

    ids = reference.tokenizer(prompt).input_ids
    pruned = reference.image_tokens(reference.pixel_values([image]), spec, ids)
    n = pruned[0].tokens.shape[0]
    full = _expand(ids, reference.image_token_id, [n])
    decoder = reference.decoder()
    plan = reference.llm_plan(full, [n], spec, decoder.num_layers)
    _, cache = decoder.prefill(reference.prompt_embeds(full, pruned[0].tokens), plan)
    text = len(full) - n
    return [(kv.keys.shape[1] - text) / n for kv in cache]


def _shares_argument(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated numbers in (0, 1] accepted, one per pruning layer "
            "after the first (e.g. 0.31,0.81)") from None


def main(argv: list[str] | None = None) -> int:
    from vllm_vtprune.embedded import model_path
    from vllm_vtprune.hf import HfReference

    p = argparse.ArgumentParser(prog="python -m vllm_vtprune.rcp_train",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="LLaVA checkpoint (default: the embedded)")
    p.add_argument("--data", default=None, help="JSONL records (default: ShapesVQA train)")
    p.add_argument("--budget", type=int, required=True, help="layer-averaged visual tokens")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=4000, help="ShapesVQA training questions")
    p.add_argument("--split", default="both", choices=("standard", "hard", "both"),
                   help="ShapesVQA split to train and evaluate on (both: in turns, as "
                        "shapes-llava v2 was trained; v1 knows the standard one only)")
    p.add_argument("--init", default=None,
                   help="resume from this checkpoint (its step count continues the run)")
    p.add_argument("--total-steps", type=int, default=None,
                   help="the whole run's steps when it goes in chunks (default: this chunk "
                        "ends it); schedules follow the whole run, and steps past it hold "
                        "the schedules' end (a noise-free tail)")
    p.add_argument("--serve-budget", type=int, default=None,
                   help="after training, calibrate the biases for serving rcp:K up to this "
                        "K (see calibrate_for_serving); default: none (a chunk to resume)")
    p.add_argument("--threshold-masks", action="store_true",
                   help="the paper's masks (Eqs. 6-7, threshold at 0) with the sparsity "
                        "loss, instead of masks keeping the served count")
    p.add_argument("--no-calibrate", action="store_true",
                   help="the paper's start: biases 0, r* annealed from 1")
    p.add_argument("--repair-weight", type=float, default=REPAIR_WEIGHT,
                   help="Eq. 22's lambda_repair (the paper's 40)")
    p.add_argument("--query-score", default=rcp.QUERY_SCORE, choices=rcp.QUERY_SCORES,
                   help="how fresh pruners aggregate S_q (Eq. 2): the softmax weights as "
                        "written, or in Eq. 4's logit space (see vllm_vtprune.methods.rcp); "
                        "with --init the checkpoint's")
    p.add_argument("--intrinsic-rows", default=rcp.INTRINSIC_ROW, choices=rcp.INTRINSIC_ROWS,
                   help="which question rows fresh pruners' a_i (Eq. 4) reads: their mean, "
                        "or the last (FastV's row); with --init the checkpoint's")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="weight of the attention-distillation term (distill_loss; not in "
                        "the paper, 0: none)")
    p.add_argument("--distill-only", action="store_true",
                   help="the pruners learn from the distillation term alone (their masks "
                        "pass no straight-through gradient); the adapters from Eq. 22's")
    p.add_argument("--later-shares", default=None, type=_shares_argument,
                   help="fresh modules' plan: each later pruning layer's share of the one "
                        "before, comma-separated (default %s for each; with --init the "
                        "checkpoint's)" % rcp.LATER_SHARE)
    p.add_argument("--freeze-pruners", action="store_true",
                   help="train the repair adapters only (the pruners as --init left them)")
    p.add_argument("--eval", type=int, default=200, help="held-out questions (0: none)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu",
                   help="where the frozen model and the modules train (e.g. cuda)")
    args = p.parse_args(argv)
    path = args.model or model_path()
    reference = HfReference.load(path)
    reference.model.to(args.device)
    text = reference.model.config.text_config
    if args.init:
        modules = rcp.load_checkpoint(args.init)
        rcp.check_fits(modules, text.num_hidden_layers, text.hidden_size, args.init)
    else:
        shares = {"later_share": args.later_shares} if args.later_shares else {}
        modules = rcp.build_modules(text.hidden_size, text.num_hidden_layers, seed=args.seed,
                                    query_score=args.query_score,
                                    intrinsic_rows=args.intrinsic_rows, **shares)
    modules = modules.on(args.device)
    samples = (jsonl_samples(args.data) if args.data
               else shapes_samples(None, args.samples, split=args.split))
    previous = modules.info.get("steps", 0) if args.init else 0
    resumed = dict(modules.info) if args.init else None
    if modules.info.get("serving_biases"):
        raise SystemExit(f"--init {args.init}: calibrated for serving already; resume from "
                         "the chunk's checkpoint before --serve-budget")
    if args.freeze_pruners:
        for pruner in modules.pruners.values():
            pruner.requires_grad_(False)
    started = time.time()
    history = train(reference, modules, samples, steps=args.steps, batch=args.batch,
                    lr=args.lr, budget=args.budget, seed=args.seed,
                    log=lambda m: print(m, file=sys.stderr, flush=True),
                    calibrate=not args.init and not args.no_calibrate,
                    warmup=args.no_calibrate and not args.init, first_step=previous,
                    total_steps=args.total_steps, fixed_count=not args.threshold_masks,
                    repair_weight=args.repair_weight, distill_weight=args.distill_weight,
                    distill_only=args.distill_only)
    settings = {"data": args.data or f"shapes_vqa {args.split} training split",
                "batch": args.batch, "lr": args.lr, "repair_weight": args.repair_weight,
                "distill_weight": args.distill_weight, "distill_only": args.distill_only,
                "trained": "adapters" if args.freeze_pruners else "pruners and adapters",
                "masks": "threshold (Eqs. 6-7)" if args.threshold_masks
                         else "fixed count (gumbel top-k)", "split": args.split}
    if resumed and not args.steps:  # calibration only: the checkpoint's training settings
        settings = {k: resumed[k] for k in settings if k in resumed}
    modules.info = {"model": os.path.abspath(path), "budget": args.budget,
                    "steps": previous + args.steps, "seed": args.seed, "init": args.init,
                    "total_steps": args.total_steps or previous + args.steps,
                    "resumed_from": resumed, **settings}
    if args.serve_budget:
        trained = {l: float(p.bias.detach()) for l, p in modules.pruners.items()}
        served = calibrate_for_serving(reference, modules, samples[:32], args.serve_budget,
                                       args.budget)
        modules.info |= {"trained_biases": trained, "serving_biases": served,
                         "serve_budget": args.serve_budget}
    rcp.save_checkpoint(modules, args.out)
    last = history[-min(20, len(history)):]
    report = {**modules.info, "seconds": round(time.time() - started, 1),
              "losses_last_steps": {k: sum(h[k] for h in last) / len(last)
                                    for k in ("total", "task", "repair", "sparse", "distill")
                                    if k in last[0]}
                                   if last else None,
              "history": history[::max(1, len(history) // 50)]}
    if args.eval:
        report["heldout"] = evaluate(reference, args.out, args.budget,
                                     shapes_samples(None, args.eval, start=40000,
                                                    split=args.split, heldout=True))
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
