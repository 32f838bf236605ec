"""What an encoder-side method adds to the encoder stage, per image, on the transformers
path of the model the latency bench serves, against vanilla's encoder stage (the tower and
the projection of every patch) and the pruned request's LLM prefill, all measured in this
run, interleaved (one round over every configuration per repeat; medians).

    python bench/selection.py [--model llm150m|embedded|PATH] [--budget 64]
        [--methods resprune,divprune,...] [--threads 1] [--repeats 9] [--json out.json]

Per method: its encoder stage, the part beyond vanilla's (the selection, with any probe
it needs) and that part's share of the pruned prefill (issue 14's limit: 10 % at 64
tokens); for a method inside the tower (DCP) its stage against vanilla's tower alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import median_ms  # bench/ is the script's directory

SELECTION_LIMIT = 0.10  # share of the pruned request's prefill a selection may take
PROMPT = "USER: <image>\nwhat color is the square left of the red circle ? ASSISTANT:"


def model_path(name: str) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from latency import model_path as latency_model_path

    return latency_model_path(name)


def sample_image():
    from vllm_vtprune.data import shapes_vqa as sv

    return sv.make_sample(sv.split_of("hard").heldout_seed, 0, split="hard").image


def encoder_stages(ref, specs: dict, repeats: int) -> dict:
    """Median ms of each configuration's encoder stage (``None``: vanilla), interleaved."""
    prompt_ids = ref.tokenizer(PROMPT).input_ids
    pixels = ref.pixel_values([sample_image()])
    calls = {name: (lambda spec=spec: ref.image_tokens(pixels, spec, prompt_ids)[0])
             for name, spec in specs.items()}
    calls["tower"] = lambda: tower_only(ref, pixels)
    times = {name: [] for name in calls}
    for name, call in calls.items():
        call()  # off the clock: first-call allocations
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def tower_only(ref, pixels):
    from vllm_vtprune import pipeline

    return pipeline.run_layers(ref.tower, ref.tower.embed(pixels), 0, ref.tower.num_layers)


def prefill_ms(ref, spec, repeats: int) -> tuple[float, int]:
    """Median LLM prefill of the pruned request, and its prompt length."""
    from vllm_vtprune.hf import _expand

    prompt_ids = ref.tokenizer(PROMPT).input_ids
    image = ref.image_tokens(ref.pixel_values([sample_image()]), spec, prompt_ids)[0]
    ids = _expand(prompt_ids, ref.image_token_id, [image.tokens.shape[0]])
    embeds = ref.prompt_embeds(ids, image.tokens)[None]
    lm = ref.model.model.language_model
    return median_ms(lambda: lm(inputs_embeds=embeds), repeats), len(ids)


def main(argv=None) -> None:
    from vllm_vtprune import registry
    from vllm_vtprune import spec as spec_mod
    from vllm_vtprune.hf import HfReference

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llm150m")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--methods", default=",".join(
        m for m in registry.served() if registry.get(m).where is not registry.Where.INSIDE_LLM
        or registry.get(m).encoder_budget is not None))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref = HfReference.load(model_path(args.model))
    methods = args.methods.split(",")
    with torch.no_grad():
        specs = {"vanilla": None, **{m: spec_mod.parse(f"{m}:{args.budget}") for m in methods}}
        stage = encoder_stages(ref, specs, args.repeats)
        rows = []
        for m in methods:
            prefill, prompt = prefill_ms(ref, specs[m], args.repeats)
            extra = stage[m] - stage["vanilla"]
            rows.append({"method": m, "budget": args.budget, "prompt_tokens": prompt,
                         "encoder_ms": stage[m], "extra_ms": extra, "prefill_ms": prefill,
                         "extra_share_of_prefill": extra / prefill,
                         "encoder_vs_tower": stage[m] / stage["tower"]})
    print(f"vanilla encoder stage {stage['vanilla']:.1f} ms/image (tower {stage['tower']:.1f} "
          f"ms); {args.threads} thread(s), median of {args.repeats}")
    print(f"{'method':<12} {'encoder ms':>10} {'extra ms':>9} {'prefill ms':>11} "
          f"{'extra/prefill':>14} {'encoder/tower':>14}")
    for r in rows:
        print(f"{r['method']:<12} {r['encoder_ms']:>10.1f} {r['extra_ms']:>9.1f} "
              f"{r['prefill_ms']:>11.1f} {r['extra_share_of_prefill']:>13.1%} "
              f"{r['encoder_vs_tower']:>13.2f}x")
    print(f"limit: extra <= {SELECTION_LIMIT:.0%} of the pruned prefill; encoder/tower < 1 "
          "for a method that prunes inside the tower (dcp)")
    if args.json:
        Path(args.json).write_text(json.dumps({"stage_ms": stage, "threads": args.threads,
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
