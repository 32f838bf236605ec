"""Where RCP loses accuracy on a ShapesVQA LLaVA (transformers reference path).

    python bench/rcp_diagnosis.py --split hard --num 100 --budgets 64,128 --images 40

RCP (Zhang et al., "RCP: Representation Consistency Pruner for Mitigating Distribution
Shift in Large Vision-Language Models", arXiv 2604.04972; ``vllm_vtprune.methods.rcp``)
prunes before each pruning layer to the budget's planned count there
(:func:`vllm_vtprune.methods.rcp.planned_counts` with the checkpoint's shares: 52, 16 and
13 of 576 at layers 1, 7 and 13 for ``rcp:64`` with the modules shipped for the 16-layer
shapes-llava v2). Prints, per budget:

* accuracy on ``--num`` held-out questions: full tokens; ``rcp:B`` with the trained
  modules; the same pruners with identity repair adapters (Sec. III-C's
  initialisation: what the adapters add); FastV's rule on the same plan (the same
  counts at the same layers, chosen by last-token attention instead);
* with ``--schedules``, FastV's rule (or with ``--schedule-chooser o`` the coverage
  oracle below) on other plans at the pruning layers (``29``: a flat 29 from the first;
  ``56/16/5``: one count per pruning layer), with their layer averages: what a plan's
  shape is worth apart from the pruners;
* with ``--swaps``, which pruning layer loses: per combination such as ``rff``, the
  learned pruner (``r``), FastV's rule (``f``), a coverage oracle (``o``: the patches
  nearest each asked-about object's centre first, from the scene itself; what the
  planned counts allow any choice to recover) or the full-token model's answer
  attention (``t``: what RCP training's distillation term aims at) before each pruning
  layer in turn, the same planned counts, no repair adapters (their identity
  initialisation);
* how often the first pruning layer's top-K tokens lie on object patches, over
  ``--images`` held-out images: the trained logits (Eq. 5), their intrinsic-attention
  term A alone (Eq. 4), their learned terms S_q + S_i alone (Eqs. 2-3), FastV's
  last-token attention, and the base rate;
* which way the training gradient pushes each kind of token: over ``--gradients``
  training samples, masks set to the trained top-K (the first budget's count) at the
  first pruning layer, the share of kept/dropped object/background tokens whose
  straight-through gradient dL/dm (Eq. 22's task and repair terms) is negative, i.e.
  would raise their mask, and its median.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from polymorphic_diagnosis import _accuracy, prompt_states  # noqa: E402


def identity_adapter_checkpoint(ckpt: str, out: str) -> str:
    """``ckpt``'s pruners with freshly initialised (identity) adapters, saved at ``out``."""
    from vllm_vtprune.methods import rcp

    modules = rcp.load_checkpoint(ckpt)
    fresh = rcp.build_modules(modules.hidden_size, modules.num_layers, modules.pruning_layers,
                              tuple(sorted(modules.adapters)), **modules.config)
    modules.adapters = fresh.adapters
    modules.info = {**modules.info, "diagnosis": "adapters reset to identity"}
    rcp.save_checkpoint(modules, out)
    return out


@torch.no_grad()
def object_shares(ref, modules, split, images: int, counts: list[int]) -> dict:
    """Share of object patches among the top-``count`` tokens of each ranking at the
    first pruning layer, averaged over held-out images (one question each)."""
    from vllm_vtprune import rcp_train
    from vllm_vtprune.methods import rcp

    forward = rcp_train.MaskedForward(ref)
    first = modules.pruning_layers[0]
    pruner = modules.pruners[first]
    names = ("trained logits (Eq. 5)", "A alone (Eq. 4)", "S_q + S_i alone (Eqs. 2-3)",
             "FastV last-token attention", "base rate")
    sums = {k: {n: 0.0 for n in names} for k in counts}
    for index in range(images):
        on, enc, x, probs = prompt_states(ref, forward, split, index, first)
        logits = forward.pruner_logits(pruner, x, probs, enc)
        intrinsic = rcp.attention_logit(forward.intrinsic(probs, enc)[None])[0]
        scores = {names[0]: logits, names[1]: intrinsic, names[2]: logits - intrinsic,
                  names[3]: probs[:, -1, enc.visual].mean(0)}
        for k in counts:
            for name, score in scores.items():
                sums[k][name] += on[torch.topk(score, k).indices].float().mean().item()
            sums[k]["base rate"] += on.float().mean().item()
    return {f"top {k}": {n: round(v / images, 3) for n, v in s.items()} for k, s in sums.items()}


def straight_through_signs(ref, modules, split, images: int, count: int) -> dict:
    """Per kind of token (kept/dropped x object/background): the share whose
    straight-through gradient dL/dm of the task and repair losses (Eq. 22's weights) is
    negative, i.e. whose mask the gradient would raise, and the median gradient; masks
    the trained top-``count`` at the first pruning layer, on ``images`` training-split
    samples (one question each)."""
    from vllm_vtprune import rcp_train
    from vllm_vtprune.methods import rcp

    for p in ref.model.parameters():
        p.requires_grad_(False)
    first = modules.pruning_layers[0]
    one = rcp.RcpModules(modules.hidden_size, modules.num_layers,
                         {first: modules.pruners[first]}, modules.adapters, modules.config)
    forward = rcp_train.MaskedForward(ref)
    forward.repair_layers = tuple(sorted(modules.adapters))
    leaf = {}

    def top_count(pruner, x, probs, enc, mask, tau, hard, noise):
        with torch.no_grad():
            logits = forward.pruner_logits(pruner, x, probs, enc)
        m = torch.zeros(len(enc.visual))
        m[torch.topk(logits, count).indices] = 1.0
        leaf["m"] = m.requires_grad_(True)
        return leaf["m"]

    forward._prune = top_count
    kinds = ("kept object", "kept background", "dropped object", "dropped background")
    found = {t: {k: [] for k in kinds} for t in ("task", "repair")}
    for index in range(images):
        with torch.no_grad():
            on, enc, _, _ = prompt_states(ref, forward, split, index, 0, seed=split.train_seed)
        with torch.no_grad():
            _, teacher, _ = forward(enc, None, 1.0)
        for term, weight in (("task", rcp_train.TASK_WEIGHT),
                             ("repair", rcp_train.REPAIR_WEIGHT)):
            terms = rcp_train.losses(forward(enc, one, 1.0), teacher, enc, modules.num_layers,
                                     0.0, sparse_weight=0.0)
            grad, = torch.autograd.grad(weight * terms[term], leaf["m"])
            kept = leaf["m"].detach() > 0.5
            for kind, sel in zip(kinds, (kept & on, kept & ~on, ~kept & on, ~kept & ~on)):
                if sel.any():
                    found[term][kind].append(grad[sel])
    return {term: {kind: {"share raised": round(float((torch.cat(g) < 0).float().mean()), 3),
                          "median dL/dm": float(f"{float(torch.cat(g).median()):.4g}")}
                   for kind, g in by_kind.items() if g}
            for term, by_kind in found.items()}


def accuracies(ref, pairs, ckpt: str, plans: dict[int, dict[int, int]]) -> dict:
    """Full tokens; per budget ``rcp:B`` with ``ckpt``, with its adapters at identity, and
    FastV's rule keeping the same counts at the same layers (``plans``: budget ->
    :meth:`rcp.RcpModules.plan`)."""
    out = {"full tokens": _accuracy(ref, pairs, None)}
    with tempfile.TemporaryDirectory() as tmp:
        plain = identity_adapter_checkpoint(ckpt, os.path.join(tmp, "identity.safetensors"))
        for budget, counts in plans.items():
            row = out[f"budget {budget} (kept {schedule_name(counts)})"] = {}
            row["rcp, trained modules"] = _accuracy(ref, pairs, f"rcp:{budget},ckpt={ckpt}")
            row["rcp, identity adapters"] = _accuracy(ref, pairs, f"rcp:{budget},ckpt={plain}")
            row["fastv's rule, same plan"] = staged_accuracy(ref, pairs, counts)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def schedule_name(counts: dict[int, int]) -> str:
    return ", ".join(f"{k} from layer {l}" for l, k in sorted(counts.items()))


def staged_accuracy(ref, pairs, counts: dict[int, int], oracle=None) -> float:
    """Accuracy with FastV's rule (Chen et al., arXiv 2403.06764: the last prompt token's
    head-averaged attention ranks the image's live tokens) applied before each layer of
    ``counts``, keeping that many there: FastV's choice on RCP's plan. With ``oracle``
    (a :class:`SceneOracle` or :class:`AnswerAttention`) it chooses instead."""
    from vllm_vtprune import llm_loop

    def keeping(spans, k, layer):
        return oracle.keeping(spans, k, layer) if oracle else _fastv_keeping(spans, k)

    def llm_plan(ids, sizes, spec, num_layers, patches=None):
        spans = llm_loop.spans_of(torch.tensor(ids) == ref.image_token_id, sizes)
        return llm_loop.Plan({layer: keeping(spans, k, layer) for layer, k in counts.items()})

    return _accuracy_with_plan(ref, pairs, llm_plan, oracle.before if oracle else None)


def _fastv_keeping(spans, k: int):
    """FastV's decision keeping ``k`` tokens of each image (all when it has fewer)."""
    from vllm_vtprune.methods import fastv

    return fastv.decision(spans, lambda n: min(k, n))


def _accuracy_with_plan(ref, pairs, llm_plan, before=None) -> float:
    """Accuracy with ``llm_plan(ids, sizes, spec, num_layers, patches)`` in place of a
    method's plan on the reference path; ``before(i)`` runs before question ``i``."""
    ref.llm_plan = llm_plan  # this instance only: every other method keeps its own plan
    try:
        return _accuracy(ref, pairs, "fastv:1", before)  # any in-LLM spec: its plan replaced
    finally:
        del ref.llm_plan


def coverage_scores(objects, grid: int) -> torch.Tensor:
    """An oracle's per-patch score from the scene itself: each asked-about object's patches
    (:func:`shapes_vqa.object_patches`) ranked by their centres' distance to the object's
    centre, scored minus that rank, so that keeping the top K covers every object's centre
    before any object's second patch; background (and distractor) patches last.
    Not a pruning method: the bound on what choosing K tokens can recover."""
    from vllm_vtprune.data import shapes_vqa as sv

    scores = torch.full((grid * grid,), -1e9)
    col, row = torch.arange(grid * grid) % grid, torch.arange(grid * grid) // grid
    for obj in objects:
        idx = torch.nonzero(torch.from_numpy(sv.object_patches([obj]))).flatten()
        cx = (col[idx].float() + 0.5) * sv.PATCH - obj.cx  # patch centre minus object centre
        cy = (row[idx].float() + 0.5) * sv.PATCH - obj.cy
        rank = torch.argsort(torch.argsort(cx * cx + cy * cy, stable=True), stable=True)
        scores[idx] = torch.maximum(scores[idx], -rank.float())
    return scores


def _oracle_keeping(spans, k: int, scores_of):
    """Each image keeps its ``k`` live tokens of highest :func:`coverage_scores`
    (``scores_of()``: the current question's), ties to the lower position."""
    from vllm_vtprune.llm_loop import Verdict

    def decide(view):
        rows = view.rows
        keep = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
        for start, end in spans:
            cols = torch.nonzero((rows >= start) & (rows < end)).flatten()
            score = scores_of()[(rows[cols] - start).cpu()]
            chosen = torch.argsort(-score, stable=True)[:min(k, cols.numel())]
            keep[cols] = False
            keep[cols[chosen.to(cols.device)]] = True
        return Verdict(torch.nonzero(keep).flatten())

    return decide


class SceneOracle:
    """The coverage oracle over a list of questions: :meth:`before` question ``i`` sets
    its scene's :func:`coverage_scores`, which :meth:`keeping`'s decisions read."""

    def __init__(self, objects: list, grid: int):
        self.objects, self.grid, self.scores = objects, grid, None

    def before(self, i: int) -> None:
        self.scores = coverage_scores(self.objects[i], self.grid)

    def keeping(self, spans, k: int, layer: int):
        return _oracle_keeping(spans, k, lambda: self.scores)


class AnswerAttention:
    """The full-token model's choice over a list of questions: :meth:`before` question
    ``i`` runs it unpruned and keeps, per pruning layer l, its answer row's attention
    from layer l-1 to the last (``rcp_train.attention_targets``, the target of RCP
    training's distillation term); :meth:`keeping` ranks the live tokens by it. Not a
    pruning method (it needs the full forward first): what the distilled pruners aim at."""

    def __init__(self, ref, pairs, layers):
        from vllm_vtprune import rcp_train

        self.ref, self.pairs, self.layers = ref, pairs, tuple(layers)
        self.forward = rcp_train.MaskedForward(ref)
        self.targets = None

    @torch.no_grad()
    def before(self, i: int) -> None:
        from vllm_vtprune import rcp_train

        image, qa = self.pairs[i]
        enc = rcp_train.encode(self.ref, rcp_train.Sample(image, qa.question, qa.answer))
        self.forward.attention = []
        try:
            self.forward(enc, None, 1.0)
            self.targets = rcp_train.attention_targets(self.forward.attention, self.layers)
        finally:
            self.forward.attention = None

    def keeping(self, spans, k: int, layer: int):
        return _oracle_keeping(spans, k, lambda: self.targets[layer].cpu())


CHOOSERS = {"r": "RCP's learned pruner", "f": "FastV's rule",
            "o": "the coverage oracle (coverage_scores)",
            "t": "the full-token model's answer attention (AnswerAttention)"}


def swap_accuracies(ref, pairs, modules, budget: int, combos: list[str],
                    oracle: SceneOracle | None = None,
                    teacher: AnswerAttention | None = None) -> dict:
    """Accuracy per combination of choosers at the pruning layers: ``r`` the learned pruner
    (Eqs. 1-5, served as :func:`rcp.served_choice`), ``f`` FastV's rule, ``o`` the
    coverage oracle (needs ``oracle``, over ``pairs``' scenes), ``t`` the full-token
    model's answer attention (needs ``teacher``), each keeping ``rcp:budget``'s planned
    count there; the adapters left out (Delta h = 0, as at their initialisation), so only
    the choices differ."""
    from vllm_vtprune import llm_loop
    from vllm_vtprune.methods import rcp

    def plan_for(combo):
        def choose(chooser, layer, spans, state):
            if chooser == "r":
                return state.decide(layer)
            if chooser == "f":
                return _fastv_keeping(spans, state.counts[layer])
            return (oracle if chooser == "o" else teacher).keeping(spans, state.counts[layer],
                                                                   layer)

        def llm_plan(ids, sizes, spec, num_layers, patches=None):
            spans = llm_loop.spans_of(torch.tensor(ids) == ref.image_token_id, sizes)
            state = rcp.RequestState(modules, spans, budget)
            return llm_loop.Plan({layer: choose(chooser, layer, spans, state)
                                  for chooser, layer in zip(combo, modules.pruning_layers)})
        return llm_plan

    out = {}
    for combo in combos:
        if (len(combo) != len(modules.pruning_layers) or set(combo) - set(CHOOSERS)
                or ("o" in combo and oracle is None) or ("t" in combo and teacher is None)):
            raise SystemExit(f"--swaps {combo!r}: one of {', '.join(CHOOSERS)} per pruning "
                             f"layer {modules.pruning_layers}")
        hooks = [c.before for name, c in (("o", oracle), ("t", teacher)) if name in combo]
        out[combo] = _accuracy_with_plan(ref, pairs, plan_for(combo),
                                         lambda i: [hook(i) for hook in hooks])
        print(combo, out[combo], file=sys.stderr, flush=True)
    return out


def schedule_accuracies(ref, pairs, layers, num_layers: int, tokens: int,
                        schedules: list[str], oracle=None) -> dict:
    """FastV's rule (or ``oracle``: a :class:`SceneOracle` or :class:`AnswerAttention`) on
    each ``K1/K2/...`` schedule at the pruning ``layers`` (fewer counts than layers: the
    last one holds), with its layer average."""
    from vllm_vtprune.methods._common import layer_counts

    out = {}
    for name in schedules:
        counts = dict(zip(layers, (int(k) for k in name.split("/"))))
        average = sum(layer_counts(num_layers, tokens, counts)) / num_layers
        out[name] = {"layer_average": round(average, 2),
                     "accuracy": staged_accuracy(ref, pairs, counts, oracle)}
        print(name, json.dumps(out[name]), file=sys.stderr, flush=True)
    return out


def main() -> None:
    from vllm_vtprune.data import shapes_vqa as sv
    from vllm_vtprune.embedded import model_path, with_shipped_modules
    from vllm_vtprune.hf import HfReference
    from vllm_vtprune.methods import rcp
    from vllm_vtprune.spec import parse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--ckpt", default=None, help="default: the modules shipped for it")
    p.add_argument("--split", default="hard")
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--budgets", default="64,128")
    p.add_argument("--images", type=int, default=40,
                   help="held-out images for the object shares (0: none)")
    p.add_argument("--gradients", type=int, default=24,
                   help="training samples for the straight-through gradient signs (0: none)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy runs")
    p.add_argument("--schedules", default=None,
                   help="FastV's rule on these plans at the pruning layers, e.g. "
                        "'29;56/16/5' (accuracy and layer average)")
    p.add_argument("--schedule-chooser", default="f", choices=("f", "o", "t"),
                   help="who chooses on --schedules: FastV's rule (f), the coverage "
                        "oracle (o) or the full-token model's answer attention (t)")
    p.add_argument("--swaps", default=None,
                   help="learned pruner (r), FastV's rule (f), the coverage oracle (o) or "
                        "the full-token model's answer attention (t) per pruning layer, at "
                        "the first budget, e.g. 'rrr;fff;rff;ooo;ttt'")
    args = p.parse_args()
    ref = HfReference.load(args.model or model_path())
    ckpt = args.ckpt or with_shipped_modules(parse("rcp:1"), ref.model.config).value("ckpt")
    if ckpt is None:
        raise SystemExit("no RCP modules ship for this model: give --ckpt")
    modules = rcp.load_checkpoint(ckpt)
    split = sv.split_of(args.split)
    asked = list(sv.iter_sample_questions(split.heldout_seed, args.num, start=sv.BENCH_START,
                                          split=split))
    pairs = [(sample.image, qa) for sample, qa in asked]
    oracle = SceneOracle([sample.objects for sample, _ in asked], ref.tower.grid[0])
    teacher = AnswerAttention(ref, pairs, modules.pruning_layers)
    tokens = ref.tower.grid[0] * ref.tower.grid[1]
    first = modules.pruning_layers[0]
    plans = {int(b): modules.plan(tokens, int(b)) for b in args.budgets.split(",")}
    counts = [plan[first] for plan in plans.values()]
    result = {"model": str(args.model or model_path()), "ckpt": str(ckpt), "split": args.split,
              "questions": len(pairs), "first_pruning_layer": first, "accuracy": {}}
    if not args.no_accuracy:
        result["accuracy"] = accuracies(ref, pairs, ckpt, plans)
    if args.schedules:
        chooser, key = {"f": (None, "fastv_rule_schedules"), "o": (oracle, "oracle_schedules"),
                        "t": (teacher, "answer_attention_schedules")}[args.schedule_chooser]
        result[key] = schedule_accuracies(ref, pairs, modules.pruning_layers, modules.num_layers,
                                          tokens, args.schedules.split(";"), chooser)
    if args.swaps:
        budget = int(args.budgets.split(",")[0])
        result["swaps"] = {"budget": budget, "plan": schedule_name(plans[budget]),
                           "full tokens": result["accuracy"].get("full tokens")
                           or _accuracy(ref, pairs, None),
                           "accuracy": swap_accuracies(ref, pairs, modules, budget,
                                                       args.swaps.split(";"), oracle,
                                                       teacher)}
    if args.images:
        result["object_share_of_top"] = object_shares(ref, modules, split, args.images, counts)
    if args.gradients:
        result["straight_through_gradient"] = straight_through_signs(
            ref, modules, split, args.gradients, counts[0])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
