"""Why DCP-Prune loses accuracy on a ShapesVQA LLaVA: its choice, or its pruning inside
the tower? Measured on the transformers reference path, same questions for every row:

* ``dcp``: DCP as served (an ACGR stage after every second tower layer, TATCS at the
  last when kappa > delta);
* ``dcp choice, full context``: the patches DCP keeps, read from the unpruned tower's
  feature layer instead (what the LLM would get had the tower seen every patch);
* ``dcp without recovery (alpha 0)``: DCP as served with Eq. 4's fusion coefficient 0
  (the anchors pass unchanged; ablates ACGR's recovery, not its scores);
* ``dcp one stage``: DCP's last stage (Eq. 9 scores, Eq. 4 recovery, TATCS) once, on the
  unpruned feature layer;
* ``cls top-k``: the K patches the CLS query attends to most at the feature layer;
* ``random``: K patches drawn uniformly (seeded per image);
* ``random inside the tower``: patches dropped at random on DCP's schedule inside the
  tower (what pruning inside the tower costs whatever the choice).

It also prints how far DCP's tokens drift from the same patches read from the unpruned
tower (mean cosine after the projector, norm ratio at the feature layer), and where the
CLS query looks: the share of its attention (feature layer and
every DCP stage layer, head-averaged) that falls on patches an object or distractor
touches, against those patches' share of the grid.

    python bench/dcp_diagnosis.py [--model DIR] [--split hard] [--num 100]
        [--budgets 64,16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from vllm_vtprune.embedded.conversation import user_turn


def object_patches(sample) -> torch.Tensor:
    """Patches an object's or distractor's box overlaps, [576] bool."""
    from vllm_vtprune.data import shapes_vqa as sv

    return torch.from_numpy(sv.object_patches(sample.objects + sample.distractors))


class Diagnosis:
    def __init__(self, path: str):
        from vllm_vtprune.hf import HfReference

        self.ref = HfReference.load(path)
        self.tower = self.ref.tower
        self.project = self.ref.model.model.multi_modal_projector

    def answer(self, question: str, feats: torch.Tensor) -> str:
        from vllm_vtprune.hf import _expand

        ref = self.ref
        ids = _expand(ref.tokenizer(user_turn(question)).input_ids, ref.image_token_id,
                      [feats.shape[0]])
        return ref.greedy(ids, feats).strip()

    @torch.no_grad()
    def layers(self, pixels: torch.Tensor):
        """Every layer's input [1, 577, C] up to the feature layer's, and its output."""
        h = self.tower.embed(pixels)
        inputs = []
        for i in range(self.tower.num_layers):
            inputs.append(h)
            h = self.tower.layer(i, h)
        return inputs, h

    @torch.no_grad()
    def cls_attention(self, layer_input: torch.Tensor, i: int) -> torch.Tensor:
        """[576] head-averaged CLS attention to the patches at layer ``i``."""
        return self.tower.probe(i, layer_input).cls_attn.float().mean(0)[1:]

    @torch.no_grad()
    def dcp(self, question: str, image, k: int, alpha: float | None = None):
        """DCP as served at ``k`` (Eq. 4's fusion coefficient ``alpha`` instead of the
        paper's 0.1 when given): the pruned image and its feature-layer tokens."""
        from vllm_vtprune import spec as spec_mod

        seen = []
        spec = spec_mod.parse(f"dcp:{k}" + (f",alpha={alpha}" if alpha is not None else ""))
        hook = self.project.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            _, pruned = self.ref.generate(user_turn(question), [image], spec, max_new_tokens=0)
        finally:
            hook.remove()
        return pruned[0], seen[-1].reshape(-1, seen[-1].shape[-1]).float()

    @torch.no_grad()
    def random_inside(self, pixels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        """Patches dropped at random inside the tower on DCP's schedule (after every
        second layer, nested, down to ``k`` at the last stage): [k, D] LLM tokens."""
        from vllm_vtprune.methods import dcp

        tower, g = self.tower, torch.Generator().manual_seed(seed)
        targets = dcp.schedule(576, k, tower.num_layers, every=2)
        h = tower.embed(pixels)
        for i in range(tower.num_layers):
            h = tower.layer(i, h)
            stage = (i + 1) // 2 - 1
            if (i + 1) % 2 == 0 and stage < len(targets):
                keep = torch.sort(torch.randperm(h.shape[1] - 1, generator=g)[:targets[stage]]).values
                h = torch.cat([h[:, :1], h[:, 1 + keep]], dim=1)
        return self.project(h[0, 1:])

    @torch.no_grad()
    def one_stage(self, inputs, out, k: int, text) -> torch.Tensor:
        """DCP's last stage once, on the unpruned feature layer: [k, D] LLM tokens."""
        from vllm_vtprune.methods import dcp

        last = self.tower.num_layers - 1
        x_att, x_out, probe = self.tower.layer_probed(last, inputs[last])
        y = x_out[0, 1:].float()
        scores = dcp.StageScores(probe.cls_attn[:, 1:], inputs[last][0, 1:].float(),
                                 x_att[0, 1:].float(), probe.attn[1:, 1:], probe.values[:, 1:])
        positions = dcp.grid_positions(y.shape[0])
        _, new = dcp._last_stage(y, k, positions, scores, dcp.Graph(dcp.K_N, dcp.TAU, dcp.ALPHA),
                                 text, dcp.DELTA, lambda: self.project(x_out[0, 1:]).float())
        return self.project(new.to(x_out.dtype))


def main(argv=None) -> None:
    from vllm_vtprune import spec as spec_mod
    from vllm_vtprune.data import shapes_vqa as sv
    from vllm_vtprune.embedded import model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--split", default="hard")
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--budgets", default="64,16")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    diag = Diagnosis(args.model or model_path())
    split = sv.split_of(args.split)
    budgets = [int(b) for b in args.budgets.split(",")]
    stage_layers = [i for i in range(diag.tower.num_layers) if (i + 1) % 2 == 0]
    correct: dict[str, int] = {}
    drift: dict[int, float] = {}  # mean cosine of DCP's tokens to the same full-context ones
    growth: dict[int, float] = {}  # mean norm ratio of the same, at the feature layer
    share = {"objects": 0.0, **{f"layer {i}": 0.0 for i in stage_layers}}
    started, n, index = time.perf_counter(), 0, sv.BENCH_START
    while n < args.num:
        sample = sv.make_sample(split.heldout_seed, index, split=split)
        index += 1
        qa = sample.qas[n % len(sample.qas)]
        pixels = diag.ref.pixel_values([sample.image])
        inputs, out = diag.layers(pixels)
        full = diag.project(out[0, 1:])
        on = object_patches(sample)
        share["objects"] += on.float().mean().item()
        for i in stage_layers:
            a = diag.cls_attention(inputs[i], i)
            share[f"layer {i}"] += (a[on].sum() / a.sum()).item()
        text = diag.ref.noun_embeds(diag.ref.tokenizer(user_turn(qa.question)).input_ids)
        cls = diag.cls_attention(inputs[-1], diag.tower.num_layers - 1)
        rows = {"full": full}
        for k in budgets:
            pruned, seen = diag.dcp(qa.question, sample.image, k)
            rows[f"dcp {k}"] = pruned.tokens
            drift[k] = drift.get(k, 0.0) + torch.nn.functional.cosine_similarity(
                pruned.tokens.float(), full[pruned.origins].float(), dim=-1).mean().item()
            growth[k] = growth.get(k, 0.0) + (seen.norm(dim=-1) / out[0, 1:][
                pruned.origins].norm(dim=-1)).mean().item()
            rows[f"dcp without recovery (alpha 0) {k}"] = diag.dcp(qa.question, sample.image,
                                                                   k, alpha=0.0)[0].tokens
            rows[f"dcp choice, full context {k}"] = full[pruned.origins]
            rows[f"dcp one stage {k}"] = diag.one_stage(inputs, out, k, text)
            rows[f"cls top-k {k}"] = full[torch.sort(torch.topk(cls, k).indices).values]
            g = torch.Generator().manual_seed(index)
            rows[f"random {k}"] = full[torch.sort(torch.randperm(576, generator=g)[:k]).values]
            rows[f"random inside the tower {k}"] = diag.random_inside(pixels, k, index)
        for name, feats in rows.items():
            correct[name] = correct.get(name, 0) + (diag.answer(qa.question, feats) == qa.answer)
        n += 1
    print(f"{args.num} {args.split} questions, {time.perf_counter() - started:.0f} s")
    print("| tokens | accuracy |\n|---|---|")
    for name, c in correct.items():
        print(f"| {name} | {c / args.num:.3f} |")
    for k, total in drift.items():
        print(f"DCP's {k} tokens against the same patches read from the unpruned tower: "
              f"mean cosine {total / args.num:.3f} (after the projector), mean norm ratio "
              f"{growth[k] / args.num:.2f} (at the feature layer)")
    print("\nCLS attention on patches an object or distractor touches "
          f"(those patches are {share['objects'] / args.num:.1%} of the grid):")
    for i in stage_layers:
        print(f"  layer {i + 1:2d} of {diag.tower.num_layers}: {share[f'layer {i}'] / args.num:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"num": args.num, "split": args.split,
                       "accuracy": {k: v / args.num for k, v in correct.items()},
                       "dcp_cosine_to_full_context": {k: v / args.num for k, v in drift.items()},
                       "dcp_norm_ratio_to_full_context": {k: v / args.num
                                                          for k, v in growth.items()},
                       "cls_share_on_objects": {k: v / args.num for k, v in share.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
