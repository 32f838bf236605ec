"""ResPrune torch path on CPU: pivoted Cholesky reading one Gram row per pick vs. a naive
residual-matrix Gram-Schmidt (both measured in this run).

    .venv/bin/python bench/resprune_cpu.py [--threads 2] [--repeats 3]

The naive form keeps the [N, D] residual matrix R and per step does
``R -= (R q) q^T`` (O(N D) per step, writing R); the implemented form computes the
pivot's Gram row V v_p and does O(N D + k N) per step, reading V only (see
vllm_vtprune/methods/resprune.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vllm_vtprune.methods import resprune


def naive_residual_matrix(v: torch.Tensor, k: int, gate: torch.Tensor) -> torch.Tensor:
    r = v.float().clone()
    e = (r * r).sum(1)
    sel = torch.zeros(v.shape[0], dtype=torch.bool)
    order = []
    p = int(torch.argmax(e))
    for step in range(k):
        if step:
            s = torch.where(sel, -1.0, gate * e)
            p = int(torch.argmax(s))
        order.append(p)
        sel[p] = True
        nrm = e[p].clamp_min(1e-30).sqrt()
        q = r[p] / nrm
        r -= torch.outer(r @ q, q)
        e = (r * r).sum(1)
    return torch.tensor(order)


def timeit(fn, repeats):
    ts = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'N':>6} {'D':>6} {'K':>5} {'gram-row cholesky ms':>20} {'naive R-matrix ms':>18} {'speedup':>8}  agreement")
    for n, d, k in [(576, 4096, 128), (2880, 4096, 640)]:
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(n, d, generator=gen)
        ones = torch.ones(n)
        t_fast, o_fast = timeit(lambda: resprune.select_order(v, k, None, 0.75, None), args.repeats)
        t_naive, o_naive = timeit(lambda: naive_residual_matrix(v, k, ones), args.naive_repeats)
        a, b = o_fast.tolist(), o_naive.tolist()
        first = next((i for i in range(k) if a[i] != b[i]), k)
        same = f"identical order" if first == k else (
            f"same first {first} picks, set overlap {len(set(a) & set(b))}/{k}"
        )
        print(
            f"{n:>6} {d:>6} {k:>5} {t_fast * 1e3:>17.1f} {t_naive * 1e3:>18.1f} "
            f"{t_naive / t_fast:>7.1f}x  {same}",
            flush=True,
        )


if __name__ == "__main__":
    main()
