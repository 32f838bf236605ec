"""Accuracy retained by each pruning method and budget, measured through real vLLM (CPU).

One offline engine serves the embedded ShapesVQA LLaVA-1.5 with the pruning class; each
(method, budget) is a per-request ``mm_processor_kwargs={"vtprune": SPEC}`` over the same
held-out questions, next to the full-token run measured in the same process. Also prints
each configuration's generate time and its ratio to the full-token run. With
``--path transformers`` the same questions go through the transformers reference path
(one request at a time), which also runs the methods inside the LLM (FastV).

    python bench/accuracy.py --quick              # ~2 min: 40 questions, 4 methods at 64
    python bench/accuracy.py [--num 200] [--budgets 192,128,64,32,16] [--methods ...]
        [--split standard|hard] [--path vllm|transformers] [--json F [--resume]]
        [--plot F.png]
    python bench/accuracy.py --json F --markdown  # the saved table, as in the README

A long table goes in chunks: ``--json F --resume`` saves after every configuration and
runs only what ``F`` does not hold yet (the full-tokens run included), so a run killed
or stopped by ``--methods`` is continued by the next with the same ``--json``.

Every served method runs by default (``random`` included); RCP with the modules shipped
for the embedded model, or untrained ones where none are shipped (labelled so).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time


def _prompt(question: str) -> str:
    from vllm_vtprune.embedded.conversation import user_turn

    return user_turn(question)


def _model() -> str:
    """--model, or the embedded model."""
    from vllm_vtprune.embedded import model_path

    return MODEL or model_path()


#: the checkpoint to measure (``--model``); None: the embedded model
MODEL = None


def _engine(**overrides):
    from vllm import LLM

    from vllm_vtprune.families.llava import ARCHITECTURE

    return LLM(model=_model(), enforce_eager=True, max_model_len=2048,
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
    from vllm_vtprune.hf import HfReference

    ref = HfReference.load(_model())

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


def _rcp_ckpt(args) -> str | None:
    """RCP's modules: --rcp-ckpt, else those shipped for the embedded model measured
    (the server picks them by the model's shape), else untrained ones for the measured
    model (`vtprune rcp-init`)."""
    from transformers import AutoConfig

    from vllm_vtprune.embedded import with_shipped_modules
    from vllm_vtprune.spec import parse

    shipped = with_shipped_modules(parse("rcp:1"), AutoConfig.from_pretrained(_model()))
    if args.rcp_ckpt is None and shipped.value("ckpt") is not None:
        return None  # the shipped ones, picked by the server alike
    if args.rcp_ckpt in (None, "identity"):
        import tempfile

        from vllm_vtprune import cli

        args.rcp_ckpt = os.path.join(tempfile.mkdtemp(), "rcp-identity.safetensors")
        cli.main(["rcp-init", _model(), "--out", args.rcp_ckpt])  # for --model's decoder
        args.rcp_label = "rcp (untrained)"
    return args.rcp_ckpt


QUICK = dict(num=40, budgets="64", methods="resprune,divprune,random,fastv")


def spec_for(method: str, budget: int, args) -> str:
    spec = f"{method}:{budget}"
    if method == "rcp" and _rcp_ckpt(args):
        spec += f",ckpt={args.rcp_ckpt}"
    return spec + "".join(f",{o.split(':', 1)[1]}" for o in args.option
                          if o.split(":", 1)[0] == method)


def plot(results: dict, full: dict, budgets: list[int], args) -> None:
    """Accuracy against visual tokens, a line per method, full tokens drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(full["accuracy"], color="black", linewidth=2, label="full tokens (576)")
    for method, by_budget in results.items():
        ax.plot(budgets, [by_budget[str(b)]["accuracy"] for b in budgets], marker="o",
                label=args.labels.get(method, method))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xticks=budgets, xticklabels=[str(b) for b in budgets],
           xlabel="visual tokens per image (budget)", ylabel="accuracy",
           title=f"ShapesVQA {args.split}, {args.num} held-out questions, through {args.path}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


def _identity(args) -> dict:
    """What makes two runs' numbers one table: the checkpoint (by its directory's name,
    the same in any clone), split, questions, path."""
    return {"model": os.path.basename(os.path.normpath(_model())), "split": args.split,
            "num": args.num, "path": args.path}


def _resumed(args) -> dict | None:
    """With --resume, what an earlier run of the same table saved to --json (its full
    tokens run and every finished configuration), else None."""
    if not (args.resume and args.json and os.path.exists(args.json)):
        return None
    with open(args.json) as f:
        saved = json.load(f)
    theirs = {k: saved.get(k) for k in _identity(args)}
    if theirs != _identity(args):
        raise SystemExit(f"--resume: {args.json} holds another table ({theirs}); this run "
                         f"is {_identity(args)}")
    return saved


def _save(args, full: dict, results: dict) -> None:
    """Every finished configuration, after each one (a killed run loses only the one
    it was in)."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_identity(args) | {"full": full, "methods": results,
                                         "labels": args.labels}, f, indent=2)


def markdown_table(saved: dict, budgets: list[int]) -> str:
    """The README's table of a saved run (``--json``): accuracy and share of full-token
    accuracy per method and budget, methods ranked by accuracy at the middle budget,
    "not yet" where the run has no result."""
    full = saved["full"]["accuracy"]
    middle = str(budgets[len(budgets) // 2])
    ranked = sorted(saved["methods"].items(),
                    key=lambda kv: -kv[1].get(middle, {}).get("accuracy", -1.0))
    lines = [f"| {saved['split']}, {saved['num']} questions | "
             + " | ".join(str(b) for b in budgets) + " |",
             "|" + "---|" * (len(budgets) + 1),
             f"| full tokens | {full:.3f} |" + " |" * (len(budgets) - 1)]
    for method, done in ranked:
        cells = [f"{done[str(b)]['accuracy']:.3f} ({done[str(b)]['accuracy'] / full:.0%})"
                 if str(b) in done else "not yet" for b in budgets]
        lines.append(f"| {saved.get('labels', {}).get(method, method)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from vllm_vtprune import registry

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--model", default=None,
                   help="a ShapesVQA LLaVA checkpoint directory (default: the embedded model)")
    p.add_argument("--budgets", default="192,128,64,32,16")
    p.add_argument("--path", choices=("vllm", "transformers"), default="vllm",
                   help="vllm (served methods) or the transformers reference path "
                        "(also methods inside the LLM that have a reference plan)")
    p.add_argument("--methods", default=None,
                   help="comma-separated; default: every method the path runs")
    p.add_argument("--split", default="standard", help="ShapesVQA split: standard or hard")
    p.add_argument("--quick", action="store_true",
                   help="40 questions, resprune, divprune, random and fastv at 64")
    p.add_argument("--json", default=None,
                   help="also write the results here, after every configuration")
    p.add_argument("--resume", action="store_true",
                   help="take the full tokens run and the configurations --json already "
                        "holds for this model, split, --num and path; run the rest")
    p.add_argument("--plot", default=None, help="PNG of accuracy against visual tokens")
    p.add_argument("--option", action="append", default=[],
                   help="METHOD:key=value added to that method's specs (repeatable), "
                        "e.g. polymorphic:layers=3-5-6")
    p.add_argument("--rcp-ckpt", default=None,
                   help="RCP modules (default: those shipped for the embedded model, else "
                        "untrained ones; 'identity' for untrained, `vtprune rcp-init`)")
    p.add_argument("--markdown", action="store_true",
                   help="print the table --json holds as Markdown (runs nothing)")
    args = p.parse_args()
    if args.markdown:
        if not (args.json and os.path.exists(args.json)):
            raise SystemExit("--markdown reads the table saved by --json F; give an existing F")
        with open(args.json) as f:
            print(markdown_table(json.load(f), [int(b) for b in args.budgets.split(",")]))
        return
    global MODEL
    MODEL = args.model
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    args.labels = {}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm_vtprune.data import shapes_vqa as sv

    split = sv.split_of(args.split)
    if args.methods is None:
        runs = [n for n, m in registry.methods().items()
                if m.served or (args.path == "transformers" and m.llm_plan is not None)]
        args.methods = ",".join(runs)
    saved = _resumed(args)
    answers = vllm_answers() if args.path == "vllm" else transformers_answers()
    pairs = list(sv.iter_questions(split.heldout_seed, args.num, start=sv.BENCH_START, split=split))
    run(answers, pairs[:8], "none")  # warm-up
    full = saved["full"] if saved else run(answers, pairs, "none")
    results: dict[str, dict[str, dict]] = saved["methods"] if saved else {}
    args.labels.update(saved["labels"] if saved else {})
    budgets = [int(b) for b in args.budgets.split(",")]
    print(f"full tokens: accuracy {full['accuracy']:.3f} per type "
          + json.dumps({k: round(v, 3) for k, v in full["per_type"].items()})
          + f", {full['seconds']:.1f} s for {args.num} requests")
    print("| method | " + " | ".join(f"{b} acc (retained)" for b in budgets) + " |")
    print("|" + "---|" * (len(budgets) + 1))
    for method in args.methods.split(","):
        done = results.setdefault(method, {})
        todo = [b for b in budgets if str(b) not in done]
        if todo:  # off the clock: engine start
            answers(pairs[:2], spec_for(method, todo[0], args))
        for b in todo:
            spec = spec_for(method, b, args)
            done[str(b)] = run(answers, pairs, spec) | {"spec": spec}
            _save(args, full, results)
        if method == "rcp" and getattr(args, "rcp_label", None):
            args.labels[method] = args.rcp_label
        cells = [f"{r['accuracy']:.3f} ({r['accuracy'] / full['accuracy']:.0%}, "
                 f"time x{r['seconds'] / full['seconds']:.2f})"
                 for r in (done[str(b)] for b in budgets)]
        print(f"| {args.labels.get(method, method)} | " + " | ".join(cells) + " |", flush=True)
    _save(args, full, results)
    shown = args.methods.split(",")
    print("\nper question type (accuracy at each budget; full tokens first):")
    for qtype in full["per_type"]:
        print(f"  {qtype:9} full {full['per_type'][qtype]:.2f} | " + " | ".join(
            f"{m} " + " ".join(f"{results[m][str(b)]['per_type'].get(qtype, 0):.2f}"
                               for b in budgets) for m in shown))
    if args.plot:
        plot(results, full, budgets, args)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
