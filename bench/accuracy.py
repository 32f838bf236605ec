"""Accuracy retained by each pruning method and budget, measured through real vLLM (CPU).

One offline engine serves the embedded ShapesVQA LLaVA-1.5 with the pruning class; each
(method, budget) is a per-request ``mm_processor_kwargs={"vtprune": SPEC}`` over the same
held-out questions, next to the full-token run measured in the same process. Also prints
each configuration's generate time and its ratio to the full-token run. With
``--path transformers`` the same questions go through the transformers reference path
(one request at a time), which also runs the methods inside the LLM (FastV).

    python bench/accuracy.py [--num 200] [--budgets 192,128,64,32] [--methods ...]
        [--path vllm|transformers]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time


def _prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def _engine(**overrides):
    from vllm import LLM

    from vllm_vtprune.embedded import model_path
    from vllm_vtprune.families.llava import ARCHITECTURE

    return LLM(model=model_path(), enforce_eager=True, max_model_len=2048,
               hf_overrides={"architectures": [ARCHITECTURE], **overrides},
               limit_mm_per_prompt={"image": 1},
               **({"enable_chunked_prefill": False, "enable_prefix_caching": False}
                  if overrides else {}))


def _generate(llm, pairs, spec=None):
    from vllm import SamplingParams

    reqs = [{"prompt": _prompt(qa.question), "multi_modal_data": {"image": image},
             **({"mm_processor_kwargs": {"vtprune": spec}} if spec else {})}
            for image, qa in pairs]
    outs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outs]


def vllm_answers():
    """Answers from real vLLM (CPU offline engine) with the pruning class, per-request
    specs: encoder-side ones on an engine with vLLM's own attention, methods inside the
    LLM on one engine started with an in-LLM spec (its masked decoder serves them all)."""
    from vllm_vtprune import pipeline
    from vllm_vtprune import spec as spec_mod

    llm = _engine()
    in_llm = []

    def answers(pairs, spec):
        parsed = spec_mod.parse(spec)
        if not pipeline.acts_in_llm(parsed):
            return _generate(llm, pairs, spec)
        if not in_llm:
            in_llm.append(_engine(vtprune="fastv:64"))
        return _generate(in_llm[0], pairs, spec)

    return answers


def transformers_answers():
    """Answers from the transformers reference path (in-LLM methods: rows removed)."""
    from vllm_vtprune import spec as spec_mod
    from vllm_vtprune.embedded import model_path
    from vllm_vtprune.hf import HfReference

    ref = HfReference.load(model_path())

    def answers(pairs, spec):
        parsed = spec_mod.parse(spec)
        return [ref.generate(_prompt(qa.question), [image], parsed)[0].strip()
                for image, qa in pairs]

    return answers


def run(answers, pairs, spec):
    t0 = time.perf_counter()
    got = answers(pairs, spec)
    seconds = time.perf_counter() - t0
    by_type = collections.Counter()
    total = collections.Counter()
    for answer, (_, qa) in zip(got, pairs):
        total[qa.qtype] += 1
        by_type[qa.qtype] += answer == qa.answer
    return {"accuracy": sum(by_type.values()) / len(pairs),
            "per_type": {t: by_type[t] / total[t] for t in total},
            "seconds": seconds}


def _rcp_ckpt(args) -> str:
    if args.rcp_ckpt == "identity":
        import tempfile

        from vllm_vtprune import cli

        args.rcp_ckpt = os.path.join(tempfile.mkdtemp(), "rcp-identity.safetensors")
        cli.main(["rcp-init", "--out", args.rcp_ckpt])
    return args.rcp_ckpt


def main() -> None:
    from vllm_vtprune import registry

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--budgets", default="192,128,64,32")
    p.add_argument("--path", choices=("vllm", "transformers"), default="vllm",
                   help="vllm (served methods) or the transformers reference path "
                        "(also methods inside the LLM that have a reference plan)")
    p.add_argument("--methods", default=None,
                   help="comma-separated; default: every method the path runs")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--option", action="append", default=[],
                   help="METHOD:key=value added to that method's specs (repeatable), "
                        "e.g. polymorphic:layers=3-5-6")
    p.add_argument("--rcp-ckpt", default=None,
                   help="RCP modules (default: those shipped for the embedded model; "
                        "'identity' for untrained ones, `vtprune rcp-init`)")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm_vtprune.data import shapes_vqa as sv

    if args.methods is None:
        runs = [n for n, m in registry.methods().items()
                if m.served or (args.path == "transformers" and m.llm_plan is not None)
                ]
        args.methods = ",".join(runs)
    answers = vllm_answers() if args.path == "vllm" else transformers_answers()
    pairs = list(sv.iter_questions(sv.HELDOUT_SEED, args.num, start=20_000))
    run(answers, pairs[:8], "none")  # warm-up
    full = run(answers, pairs, "none")
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
            spec = f"{method}:{b}" + (f",ckpt={_rcp_ckpt(args)}"
                                      if method == "rcp" and args.rcp_ckpt else "")
            spec += "".join(f",{o.split(':', 1)[1]}" for o in args.option
                            if o.split(":", 1)[0] == method)
            r = results[spec] = run(answers, pairs, spec)
            cells.append(f"{r['accuracy']:.3f} ({r['accuracy'] / full['accuracy']:.0%}, "
                         f"time x{r['seconds'] / full['seconds']:.2f})")
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
