"""Accuracy retained by each pruning method and budget, measured through real vLLM (CPU).

One offline engine serves the embedded ShapesVQA LLaVA-1.5 with the pruning class; each
(method, budget) is a per-request ``mm_processor_kwargs={"vtprune": SPEC}`` over the same
held-out questions, next to the full-token run measured in the same process. Also prints
each configuration's generate time and its ratio to the full-token run.

    python bench/accuracy.py [--num 200] [--budgets 192,128,64,32] [--methods ...]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time



def run(llm, pairs, spec):
    from vllm import SamplingParams

    reqs = [{"prompt": f"USER: <image>\n{qa.question} ASSISTANT:",
             "multi_modal_data": {"image": image},
             "mm_processor_kwargs": {"vtprune": spec}} for image, qa in pairs]
    t0 = time.perf_counter()
    outs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    seconds = time.perf_counter() - t0
    by_type = collections.Counter()
    total = collections.Counter()
    for out, (_, qa) in zip(outs, pairs):
        total[qa.qtype] += 1
        by_type[qa.qtype] += out.outputs[0].text.strip() == qa.answer
    return {"accuracy": sum(by_type.values()) / len(pairs),
            "per_type": {t: by_type[t] / total[t] for t in total},
            "seconds": seconds,
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs) / len(outs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--budgets", default="192,128,64,32")
    from vllm_vtprune import registry

    p.add_argument("--methods", default=",".join(registry.served()),
                   help="comma-separated; default: every served method")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm import LLM

    from vllm_vtprune.families.llava import ARCHITECTURE as LLAVA_ARCHITECTURE
    from vllm_vtprune.data import shapes_vqa as sv
    from vllm_vtprune.embedded import model_path

    llm = LLM(model=model_path(), enforce_eager=True, max_model_len=2048,
              hf_overrides={"architectures": [LLAVA_ARCHITECTURE]},
              limit_mm_per_prompt={"image": 1})
    pairs = list(sv.iter_questions(sv.HELDOUT_SEED, args.num, start=20_000))
    run(llm, pairs[:8], "none")  # warm-up
    full = run(llm, pairs, "none")
    results = {"none": full}
    budgets = [int(b) for b in args.budgets.split(",")]
    print(f"full tokens: accuracy {full['accuracy']:.3f} per type "
          + json.dumps({k: round(v, 3) for k, v in full["per_type"].items()})
          + f", {full['seconds']:.1f} s for {args.num} requests")
    header = "| method | " + " | ".join(f"{b} acc (retained)" for b in budgets) + " |"
    print(header)
    print("|" + "---|" * (len(budgets) + 1))
    for method in args.methods.split(","):
        cells = []
        for b in budgets:
            spec = f"{method}:{b}"
            r = results[spec] = run(llm, pairs, spec)
            cells.append(f"{r['accuracy']:.3f} ({r['accuracy'] / full['accuracy']:.0%}, "
                         f"time x{r['seconds'] / full['seconds']:.2f})")
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
