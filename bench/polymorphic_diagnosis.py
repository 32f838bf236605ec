"""Where Polymorphic loses accuracy on a ShapesVQA LLaVA (transformers reference path).

    python bench/polymorphic_diagnosis.py --model vllm_vtprune/embedded/shapes-llava-v2 \
        --split hard --num 60 --budget 64 --images 30

Polymorphic (Song et al., "Polymorphic visual token pruning", the two stages of
``vllm_vtprune.methods.polymorphic``): stage 1 merges at the encoder to 2x the budget,
stage 2 prunes inside the LLM by the rater score of Eqs. 9-11. Prints

* accuracy on ``--num`` held-out questions: full tokens, as served, stage 2 without its
  merge of pruned tokens, and stage 1 alone (no stage 2);
* how often the top-``--budget`` tokens of a ranking lie on object patches, over
  ``--images`` held-out images, all 576 tokens at decoder layer 2: Eq. 11's rater score
  against FastV's last-token attention at layer 1, and the base rate.
"""
from __future__ import annotations

import argparse
import json

import torch


def _accuracy(ref, pairs, spec, before=None) -> float:
    """Share of ``pairs`` answered right under ``spec``; ``before(i)`` runs before
    question ``i`` (what a per-question plan needs to know)."""
    from vllm_vtprune import spec as spec_mod
    from vllm_vtprune.embedded.conversation import user_turn

    parsed = spec_mod.parse(spec) if spec else None
    right = 0
    for i, (image, qa) in enumerate(pairs):
        if before is not None:
            before(i)
        right += ref.generate(user_turn(qa.question), [image], parsed)[0].strip() == qa.answer
    return right / len(pairs)


def stage_accuracies(ref, pairs, budget: int) -> dict[str, float]:
    """Full, served, stage 2 without merging, stage 1 only (stage 2's plan emptied)."""
    import dataclasses

    from vllm_vtprune import registry
    from vllm_vtprune.llm_loop import Plan
    from vllm_vtprune.methods import polymorphic as poly

    spec = f"polymorphic:{budget}"
    out = {"full tokens": _accuracy(ref, pairs, None), "served": _accuracy(ref, pairs, spec)}
    merge = poly.merge_into_kept
    poly.merge_into_kept = lambda hidden, kept, pruned: hidden[kept]
    try:
        out["stage 2 without merge"] = _accuracy(ref, pairs, spec)
    finally:
        poly.merge_into_kept = merge
    methods = registry.methods()
    original = methods["polymorphic"]
    methods["polymorphic"] = dataclasses.replace(original, llm_plan=lambda *a, **k: Plan())
    try:
        out[f"stage 1 only ({2 * budget} tokens)"] = _accuracy(ref, pairs, spec)
    finally:
        methods["polymorphic"] = original
    return out


def prompt_states(ref, forward, split, index: int, layers: int, seed: int | None = None):
    """Sample ``index`` (held-out from 20,000, or ``seed``'s from 30,000) with its first
    question: the patches its objects cover [576] (distractors not counted: no question
    is about them), the encoded sequence, and the prompt rows' hidden states and
    attention after the first ``layers`` decoder layers."""
    from vllm_vtprune import rcp_train
    from vllm_vtprune.data import shapes_vqa as sv

    if seed is None:
        sample = sv.make_sample(split.heldout_seed, sv.BENCH_START + index, split=split)
    else:
        sample = sv.make_sample(seed, 30_000 + index, split=split)
    qa = sample.qas[0]
    enc = rcp_train.encode(ref, rcp_train.Sample(sample.image, qa.question, qa.answer))
    x = enc.embeds[: int(enc.answer[0]) + 1]
    positions = torch.arange(x.shape[0])
    probs = None
    for layer in range(layers):
        x, probs = forward.layer(layer, x, positions, None)
    return torch.from_numpy(sv.object_patches(sample.objects)), enc, x, probs


@torch.no_grad()
def ranking_object_shares(ref, split, images: int, top: int) -> dict[str, float]:
    """Share of object patches among the top tokens of each ranking, averaged."""
    from vllm_vtprune import rcp_train
    from vllm_vtprune.methods import polymorphic as poly

    forward = rcp_train.MaskedForward(ref)
    sums = {"rater score (Eqs. 9-11, layer 2)": 0.0,
            "FastV attention (layer 1)": 0.0, "base rate": 0.0}
    for index in range(images):
        on, enc, x, probs = prompt_states(ref, forward, split, index, 2)
        alpha, _ = poly.rater_scores(poly.rms_normalized(x[enc.visual]),
                                     poly.rms_normalized(x[enc.question]))
        attention = probs[:, -1, enc.visual].mean(0)
        for name, score in (("rater score (Eqs. 9-11, layer 2)", alpha),
                            ("FastV attention (layer 1)", attention)):
            sums[name] += on[torch.topk(score, top).indices].float().mean().item()
        sums["base rate"] += on.float().mean().item()
    return {k: v / images for k, v in sums.items()}


def main() -> None:
    from vllm_vtprune.data import shapes_vqa as sv
    from vllm_vtprune.embedded import model_path
    from vllm_vtprune.hf import HfReference

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--split", default="hard")
    p.add_argument("--num", type=int, default=60)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--images", type=int, default=30)
    args = p.parse_args()
    ref = HfReference.load(args.model or model_path())
    split = sv.split_of(args.split)
    pairs = list(sv.iter_questions(split.heldout_seed, args.num, start=sv.BENCH_START,
                                   split=split))
    result = {"accuracy": stage_accuracies(ref, pairs, args.budget),
              "object_share_of_top": ranking_object_shares(ref, split, args.images,
                                                           args.budget)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
