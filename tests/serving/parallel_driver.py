"""Greedy answers of the embedded model under one parallel layout, for
tests/serving/test_parallel.py (run as a script: vLLM's tensor-parallel workers are
processes of their own, which a pytest process should not have to host).

    python tests/serving/parallel_driver.py --tp 2 --out answers.json

Every request has its own image and a per-request spec (every encoder-side method at two
budgets); with ``$VTPRUNE_TRACE`` set each rank appends the kept set it computed.
"""
from __future__ import annotations

import argparse
import json
import os

from vllm_vtprune import registry
from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded import model_path
from vllm_vtprune.families.llava import ARCHITECTURE

# budgets below the embedded LLM's width (128): at or above it ResPrune's picks past the
# numerical rank are decided by last bits, which a tensor-parallel tower (sharded matmuls
# summed by an all-reduce) rounds differently from one rank; the ranks still agree
SPECS = [f"{m}:{b}" for m in registry.served() if m not in registry.in_llm() for b in (64, 16)]
QUESTIONS_PER_SPEC = 3


def requests():
    pairs = list(sv.iter_questions(sv.HELDOUT_SEED, QUESTIONS_PER_SPEC * len(SPECS),
                                   start=7400))
    return [{"prompt": f"USER: <image>\n{qa.question} ASSISTANT:",
             "multi_modal_data": {"image": image},
             "mm_processor_kwargs": {"vtprune": SPECS[i // QUESTIONS_PER_SPEC]}}
            for i, (image, qa) in enumerate(pairs)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path(), enforce_eager=True, max_model_len=2048, dtype="float32",
              tensor_parallel_size=args.tp, hf_overrides={"architectures": [ARCHITECTURE]},
              enable_prefix_caching=False)
    outs = llm.generate(requests(), SamplingParams(temperature=0, max_tokens=4),
                        use_tqdm=False)
    with open(args.out, "w") as f:
        json.dump([{"spec": r["mm_processor_kwargs"]["vtprune"], "answer": o.outputs[0].text,
                    "prompt_tokens": len(o.prompt_token_ids)}
                   for r, o in zip(requests(), outs)], f)


if __name__ == "__main__":
    main()
