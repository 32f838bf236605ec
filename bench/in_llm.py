"""Prefill and decode time of pruning inside the LLM, against vanilla, in one process.

On a generated LLaVA-shaped model whose LLM has ~150M parameters (so that prefill, not
per-step overhead, dominates on a CPU), a CLIP-336/14 tower of width 256 with CLIP-L's
head size (64) and 3 layers up to the feature layer, the embedded model's tokenizer and
processor, and random weights (timings only; no answer is read):

* prefill: one request at a time, ``max_tokens=1``, median wall time over ``--repeats``
  requests, for vanilla (stock vLLM LLaVA, its own CPU attention), FastV:64 with pruned
  rows taken out of the batch (``vtprune_rows=skip``, the default) and FastV:64 masked
  only (``vtprune_rows=mask``);
* decode: per-step time from ``max_tokens=1`` and ``max_tokens=1+--decode`` runs of the
  same request (the difference over ``--decode`` steps), vanilla vs FastV:64.

Prints each arm's time and its ratio to vanilla; nothing is asserted.

    python bench/in_llm.py [--repeats 5] [--decode 32] [--spec fastv:64]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

TEXT_150M = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=16)
# the embedded tower's 64 channels in 16-channel heads make attention, not the matmuls,
# dominate the tower, unlike CLIP-L (1024 channels, 64 per head); this keeps its depth
# (4 layers, LLaVA's feature layer -2) and CLIP-L's head size
VISION_256 = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                  projection_dim=256)
#: where the latency benches keep the generated model (the tower's width in the name, so
#: a copy generated with another tower is not reused)
MODEL_DIR = Path.home() / ".cache" / "vtprune" / "llava-llm150m-clip256"


def build_model(out: Path) -> Path:
    """The embedded model's tower, tokenizer and processor with a ~150M-parameter LLM."""
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    from vllm_vtprune.embedded import build

    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = build.build_config()
    for key, value in TEXT_150M.items():
        setattr(config.text_config, key, value)
    for key, value in VISION_256.items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    tensors = {build.to_llava_hf_key(k): v.detach().to(torch.float32).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.torch_dtype = torch.float32
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(out)
    build.build_processor().save_pretrained(out)
    build._write_generation_config(out)
    return out


def llm_parameters(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text())["text_config"]
    h, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return n * (4 * h * h + 3 * h * f) + 2 * cfg["vocab_size"] * h


def engine(path: Path, spec: str | None, rows: str = "skip"):
    from vllm import LLM

    from vllm_vtprune.families.llava import ARCHITECTURE

    kwargs = dict(model=str(path), enforce_eager=True, max_model_len=2048, dtype="float32",
                  enable_chunked_prefill=False, enable_prefix_caching=False, seed=0)
    if spec is not None:
        kwargs["hf_overrides"] = {"architectures": [ARCHITECTURE], "vtprune": spec,
                                  "vtprune_rows": rows}
    return LLM(**kwargs)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def timed(llm, requests, max_tokens: int) -> list[float]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(requests[0], params, use_tqdm=False)  # warm-up
    out = []
    for req in requests:
        t = time.perf_counter()
        llm.generate(req, params, use_tqdm=False)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--spec", default="fastv:64")
    parser.add_argument("--model-dir", default=str(MODEL_DIR))
    args = parser.parse_args()

    from vllm_vtprune.data import shapes_vqa as sv
    from vllm_vtprune.embedded.conversation import user_turn

    path = build_model(Path(args.model_dir))
    pairs = list(sv.iter_questions(sv.HELDOUT_SEED, args.repeats, start=30000))
    requests = [{"prompt": user_turn(qa.question),
                 "multi_modal_data": {"image": image}} for image, qa in pairs]
    print(f"model: {path} (LLM {llm_parameters(path) / 1e6:.0f}M parameters, "
          f"{torch.get_num_threads()} threads); {args.repeats} requests, 576 image tokens")

    arms = [("vanilla", None, "skip"), (f"{args.spec} rows skipped", args.spec, "skip"),
            (f"{args.spec} masked only", args.spec, "mask")]
    results = {}
    for name, spec, rows in arms:
        llm = engine(path, spec, rows)
        prefill = statistics.median(timed(llm, requests, 1))
        full = statistics.median(timed(llm, requests, 1 + args.decode))
        results[name] = (prefill, (full - prefill) / args.decode)
        close(llm)
    base_prefill, base_step = results["vanilla"]
    print(f"{'arm':32} {'prefill s':>10} {'x vanilla':>10} {'decode ms/step':>15} {'x vanilla':>10}")
    for name, (prefill, step) in results.items():
        print(f"{name:32} {prefill:10.3f} {prefill / base_prefill:10.2f} "
              f"{step * 1e3:15.1f} {step / base_step:10.2f}")


if __name__ == "__main__":
    main()
