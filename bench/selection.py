"""Where an encoder-side method's time goes, per image, on the transformers path of the
same model the latency bench serves: the tower, the method's selection, and the pruned
request's LLM prefill, each measured in this run (medians).

    python bench/selection.py [--model llm150m|embedded|PATH] [--budget 64]
        [--methods resprune,divprune,...] [--threads 1] [--repeats 7] [--json out.json]

Prints, per method, the selection's share of the pruned prefill (issue 14's limit: 10 %
at 64 tokens) and its encoder stage (tower + selection; DCP runs the tower itself)
against the unpruned tower.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SELECTION_LIMIT = 0.10  # share of the pruned request's prefill a selection may take
PROMPT = "USER: <image>\nwhat color is the square left of the red circle ? ASSISTANT:"


def median_ms(fn, repeats: int) -> float:
    fn()  # off the clock: first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def model_path(name: str) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from latency import model_path as latency_model_path

    return latency_model_path(name)


def sample_image():
    from vllm_vtprune.data import shapes_vqa as sv

    return sv.make_sample(sv.split_of("hard").heldout_seed, 0, split="hard").image


def measure(ref, method: str, budget: int, repeats: int) -> dict:
    from vllm_vtprune import pipeline
    from vllm_vtprune import spec as spec_mod

    spec = spec_mod.parse(f"{method}:{budget}")
    prompt_ids = ref.tokenizer(PROMPT).input_ids
    pixels = ref.pixel_values([sample_image()])
    stage = [None]

    def encode():
        stage[0] = ref.image_tokens(pixels, spec, prompt_ids)[0]

    encoder_ms = median_ms(encode, repeats)
    selections = []
    for _ in range(repeats):
        encode()
        selections.append(stage[0].prune_seconds * 1000)
    image = stage[0]
    ids = pipeline_expand(ref, prompt_ids, image.tokens.shape[0])
    embeds = ref.prompt_embeds(ids, image.tokens)[None]
    lm = ref.model.model.language_model
    prefill_ms = median_ms(lambda: lm(inputs_embeds=embeds), repeats)
    return {"method": method, "budget": budget, "tokens": int(image.tokens.shape[0]),
            "encoder_ms": encoder_ms, "selection_ms": statistics.median(selections),
            "prefill_ms": prefill_ms, "prompt_tokens": len(ids)}


def pipeline_expand(ref, prompt_ids, count: int) -> list[int]:
    from vllm_vtprune.hf import _expand

    return _expand(prompt_ids, ref.image_token_id, [count])


def tower_ms(ref, repeats: int) -> float:
    from vllm_vtprune import pipeline

    pixels = ref.pixel_values([sample_image()])
    return median_ms(lambda: pipeline.run_layers(ref.tower, ref.tower.embed(pixels), 0,
                                                 ref.tower.num_layers), repeats)


def main(argv=None) -> None:
    from vllm_vtprune import registry
    from vllm_vtprune.hf import HfReference

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llm150m")
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--methods", default=",".join(
        m for m in registry.served() if registry.get(m).where is not registry.Where.INSIDE_LLM
        or registry.get(m).encoder_budget is not None))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ref = HfReference.load(model_path(args.model))
    with torch.no_grad():
        tower = tower_ms(ref, args.repeats)
        rows = [measure(ref, m, args.budget, args.repeats) for m in args.methods.split(",")]
    print(f"unpruned tower: {tower:.1f} ms/image ({args.threads} thread(s), median of "
          f"{args.repeats})")
    print(f"{'method':<12} {'tokens':>6} {'select ms':>10} {'prefill ms':>11} "
          f"{'select/prefill':>15} {'encoder ms':>11} {'encoder/tower':>14}")
    for r in rows:
        r["selection_share"] = r["selection_ms"] / r["prefill_ms"]
        r["encoder_vs_tower"] = r["encoder_ms"] / tower
        print(f"{r['method']:<12} {r['tokens']:>6} {r['selection_ms']:>10.2f} "
              f"{r['prefill_ms']:>11.2f} {r['selection_share']:>14.1%} "
              f"{r['encoder_ms']:>11.2f} {r['encoder_vs_tower']:>13.2f}x")
    print(f"limit: selection <= {SELECTION_LIMIT:.0%} of the pruned prefill; "
          "encoder/tower < 1 for a method that prunes inside the tower")
    if args.json:
        Path(args.json).write_text(json.dumps({"tower_ms": tower, "threads": args.threads,
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
