"""Greedy answers of the embedded model under one parallel layout, for
tests/serving/test_parallel.py (run as a script: vLLM's tensor-parallel workers are
processes of their own, which a pytest process should not have to host).

    python tests/serving/parallel_driver.py --tp 2 --out answers.json

Every request has its own image and a per-request spec: every encoder-side method at two
budgets, or with ``--rcp-ckpt`` every method inside the LLM at two budgets (on an engine
started with one); with ``$VTPRUNE_TRACE`` set each rank appends the decisions it took.
"""
from __future__ import annotations

import argparse
import json
import os

from vllm_vtprune import registry
from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded import SMALL_MODEL, model_path
from vllm_vtprune.families.llava import ARCHITECTURE

# budgets below the embedded LLM's width (128): at or above it ResPrune's picks past the
# numerical rank are decided by last bits, which a tensor-parallel tower (sharded matmuls
# summed by an all-reduce) rounds differently from one rank; the ranks still agree
SPECS = [f"{m}:{b}" for m in registry.served() if m not in registry.in_llm() for b in (64, 16)]
QUESTIONS_PER_SPEC = 3


def in_llm_specs(rcp_ckpt: str) -> list[str]:
    """Every method inside the LLM at two budgets (RCP with the modules in ``rcp_ckpt``)."""
    return [f"{m}:{b}" + (f",ckpt={rcp_ckpt}" if m == "rcp" else "")
            for m in registry.in_llm() for b in (64, 16)]


def requests(specs: list[str]):
    pairs = list(sv.iter_questions(sv.HELDOUT_SEED, QUESTIONS_PER_SPEC * len(specs),
                                   start=7400))
    return [{"prompt": f"USER: <image>\n{qa.question} ASSISTANT:",
             "multi_modal_data": {"image": image},
             "mm_processor_kwargs": {"vtprune": specs[i // QUESTIONS_PER_SPEC]}}
            for i, (image, qa) in enumerate(pairs)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--rcp-ckpt", default=None,
                   help="serve the methods inside the LLM (an engine started with "
                        "fastv:64), RCP with these modules; default: the encoder-side ones")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    overrides, extra, specs = {"architectures": [ARCHITECTURE]}, {}, SPECS
    if args.rcp_ckpt:
        overrides["vtprune"] = "fastv:64"
        extra = {"enable_chunked_prefill": False}
        specs = in_llm_specs(args.rcp_ckpt)
    llm = LLM(model=model_path(SMALL_MODEL), enforce_eager=True, max_model_len=2048, dtype="float32",
              tensor_parallel_size=args.tp, hf_overrides=overrides,
              enable_prefix_caching=False, **extra)
    reqs = requests(specs)
    outs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    with open(args.out, "w") as f:
        json.dump([{"spec": r["mm_processor_kwargs"]["vtprune"], "answer": o.outputs[0].text,
                    "prompt_tokens": len(o.prompt_token_ids)}
                   for r, o in zip(reqs, outs)], f)


if __name__ == "__main__":
    main()
