"""ResPrune selection: torch path vs. Triton kernel, plus a decoder prefill for scale.

GPU (the real measurement; CUDA + triton needed):

    python bench/kernels.py                      # N in {576, 2880, 10000}, D 4096,
                                                 # K in {64, 128, 640}, LLaVA-1.5-7B prefill
CPU (no GPU; torch-path figures only, a one-layer decoder extrapolated to 32 layers):

    python bench/kernels.py --cpu [--threads 2] [--sizes 576,2880] [--decoder-layers 1]

Every row times both paths in the same run on the same inputs (bf16 tokens as a
projector emits them, a 4-token "noun" text, alpha 0.75) and says whether the two
returned the same index set.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from vllm_vtprune.methods import resprune


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, repeats, warmup=1):
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(dev)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


# ----------------------------------------------------------- LLaVA-1.5-7B-shaped decoder
class Decoder:
    """Llama-2-7B shape (LLaVA-1.5-7B's LLM): 32 layers, 4096 hidden, 11008 MLP, 32
    heads, RMSNorm, RoPE, SiLU-gated MLP; random bf16 weights (timing only)."""

    def __init__(self, layers=32, hidden=4096, inter=11008, heads=32, device="cuda",
                 dtype=torch.bfloat16):
        self.h, self.nh, self.hd = hidden, heads, hidden // heads
        mk = lambda *s: (torch.randn(*s, device=device, dtype=dtype) * 0.02)  # noqa: E731
        self.layers = [
            dict(
                qkv=mk(3 * hidden, hidden), o=mk(hidden, hidden),
                gu=mk(2 * inter, hidden), down=mk(hidden, inter),
                n1=torch.ones(hidden, device=device, dtype=dtype),
                n2=torch.ones(hidden, device=device, dtype=dtype),
            )
            for _ in range(layers)
        ]
        self.device, self.dtype = device, dtype

    @staticmethod
    def _rms(x, w, eps=1e-5):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

    def _rope(self, t):
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2, device=self.device).float() / self.hd))
        ang = torch.arange(t, device=self.device).float()[:, None] * inv[None]
        emb = torch.cat([ang, ang], -1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @torch.inference_mode()
    def forward(self, x):
        t = x.shape[1]
        cos, sin = self._rope(t)

        def rot(z):
            z1, z2 = z[..., : self.hd // 2], z[..., self.hd // 2:]
            return z * cos + torch.cat([-z2, z1], -1) * sin

        for lw in self.layers:
            h = self._rms(x, lw["n1"])
            q, k, v = (h @ lw["qkv"].T).view(1, t, 3, self.nh, self.hd).unbind(2)
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))
            a = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
            x = x + a.transpose(1, 2).reshape(1, t, self.h) @ lw["o"].T
            h = self._rms(x, lw["n2"])
            g, u = (h @ lw["gu"].T).chunk(2, -1)
            x = x + (F.silu(g) * u) @ lw["down"].T
        return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="no GPU: torch path only, small sizes")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 576,2880,10000; "
                    "--cpu: 576,2880)")
    ap.add_argument("--budgets", default="64,128,640")
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decoder-layers", type=int, default=None,
                    help="layers actually run (default 32 on GPU, 1 on CPU; extrapolated to 32)")
    ap.add_argument("--prefill-tokens", type=int, default=576 + 64)
    args = ap.parse_args()

    if args.cpu:
        dev = torch.device("cpu")
        torch.set_num_threads(args.threads)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --cpu for the torch-path figures")
        dev = torch.device("cuda")
    sizes = [int(s) for s in (args.sizes or ("576,2880" if args.cpu else "576,2880,10000")).split(",")]
    budgets = [int(s) for s in args.budgets.split(",")]
    repeats = args.repeats or (1 if args.cpu else 5)
    run_kernel = dev.type == "cuda"
    if run_kernel:
        import triton

        from vllm_vtprune.kernels import resprune_order_batch

        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}")
    else:
        print(f"device CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; "
              "kernel not run (no GPU)")

    print(f"{'N':>6} {'D':>5} {'K':>4} {'torch ms':>10} {'kernel ms':>10} {'torch/kernel':>12}  same set")
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        v = torch.randn(n, args.dim, generator=gen).to(torch.bfloat16).to(dev)
        text = torch.randn(4, args.dim, generator=gen).to(torch.bfloat16).to(dev)
        for k in budgets:
            if k > n:
                continue
            t_torch, o_torch = timeit(lambda: resprune.select(v, k, text, 0.75), dev, repeats)
            if run_kernel:
                t_k, o_k = timeit(
                    lambda: resprune_order_batch(v.unsqueeze(0), k, [text], 0.75), dev, repeats
                )
                same = sorted(o_k[0].tolist()) == o_torch.tolist()
                print(f"{n:>6} {args.dim:>5} {k:>4} {t_torch * 1e3:>10.2f} {t_k * 1e3:>10.2f} "
                      f"{t_torch / t_k:>11.1f}x  {same}", flush=True)
            else:
                print(f"{n:>6} {args.dim:>5} {k:>4} {t_torch * 1e3:>10.2f} {'n/a':>10} "
                      f"{'n/a':>12}  -", flush=True)
        del v

    layers = args.decoder_layers or (1 if args.cpu else 32)
    dec = Decoder(layers=layers, device=dev)
    x = torch.randn(1, args.prefill_tokens, 4096, device=dev, dtype=torch.bfloat16)
    t_dec, _ = timeit(lambda: dec.forward(x), dev, max(1, min(repeats, 3)))
    est = t_dec * 32 / layers
    note = "" if layers == 32 else f" (ran {layers} layer(s), x{32 / layers:g} extrapolated)"
    print(f"LLaVA-1.5-7B-shaped decoder prefill, {args.prefill_tokens} tokens, bf16: "
          f"{est * 1e3:.1f} ms{note}")


if __name__ == "__main__":
    main()
