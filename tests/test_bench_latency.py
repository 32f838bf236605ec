"""Pure helpers of bench/latency.py (the bench itself drives real vLLM and asserts nothing)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_latency", Path(__file__).resolve().parents[1] / "bench" / "latency.py")
latency = importlib.util.module_from_spec(_spec)
sys.modules["bench_latency"] = latency  # dataclasses look their module up
_spec.loader.exec_module(latency)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_is_linear_interpolation(n):
    values = list(np.random.default_rng(n).exponential(size=n))
    for q in (0.5, 0.9, 0.99):
        assert latency.percentile(values, q) == pytest.approx(np.percentile(values, 100 * q))


def test_kv_capacity_from_cache_config_info():
    text = ('# HELP vllm:cache_config_info x\nvllm:cache_config_info{block_size="128",'
            'cache_dtype="auto",num_gpu_blocks="4096",prefix_caching="False"} 1.0\n')
    assert latency.kv_capacity(text) == 4096 * 128 and latency.block_size(text) == 128
    assert latency.kv_capacity("vllm:other 1\n") is None


def _result(name, budget, rates, ttft):
    runs = {c: {"req_per_s": r, "ttft_p50": t} for c, r, t in zip((1, 16), rates, ttft)}
    return {"config": name, "budget": budget, "runs": runs}


def test_speedup_and_efficiency_against_vanilla_and_the_limit():
    results = [_result("vanilla", None, (2.0, 4.0), (0.4, 1.6)),
               _result("limit:64", 64, (8.0, 16.0), (0.1, 0.2)),
               _result("resprune:64", 64, (4.0, 4.0), (0.2, 1.6))]
    latency.with_ratios(results)
    vanilla, limit, method = (r["runs"] for r in results)
    assert vanilla[1]["speedup"] == 1.0 and limit[16]["speedup"] == 4.0
    assert method[1]["speedup"] == 2.0 and method[1]["ttft_speedup"] == 2.0
    assert method[1]["efficiency"] == 0.5 and method[16]["efficiency"] == 0.25
    assert "efficiency" not in limit[1] and "efficiency" not in vanilla[1]
    assert "efficiency_enc" not in method[1]  # no `none` run: no encoder stage measured


def test_efficiency_against_the_limit_plus_vanillas_encoder_stage():
    none = _result("none", None, (2.0, 4.0), (0.4, 1.6))
    none["encode_s_per_image"] = 0.025
    results = [_result("vanilla", None, (2.0, 4.0), (0.4, 1.6)), none,
               _result("limit:64", 64, (8.0, 16.0), (0.1, 0.2)),
               _result("resprune:64", 64, (6.0, 4.0), (0.2, 1.6))]
    latency.with_ratios(results)
    method = results[3]["runs"]
    # a request of the limit takes 1/8 s, plus 25 ms of tower: 6.67 requests/s at best
    assert abs(method[1]["efficiency_enc"] - 6.0 / (1 / (1 / 8.0 + 0.025))) < 1e-12
    assert abs(method[1]["efficiency_enc"] - 0.9) < 1e-12
    assert "efficiency_enc" not in method[16]


def test_configs_put_the_limit_beside_every_budget():
    names = [c.name for c in latency.configs(["resprune", "fastv"], [128, 64])]
    assert names == ["vanilla", "limit:128", "limit:64", "none", "resprune:128", "resprune:64",
                     "fastv:128", "fastv:64"]
    servers = {c.name: c.server for c in latency.configs(["resprune", "fastv"], [64])}
    assert servers == {"vanilla": "vanilla", "limit:64": "vanilla", "none": "encoder",
                       "resprune:64": "encoder", "fastv:64": "in_llm"}
