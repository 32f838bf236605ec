"""ResPrune selection: torch path vs. Triton kernel, plus a decoder prefill for scale.

GPU (the real measurement; CUDA + triton needed):

    python bench/kernels.py                      # N in {576, 2880, 10000}, D 4096,
                                                 # K in {64, 128, 640}, LLaVA-1.5-7B prefill
CPU (no GPU; torch-path figures only, a one-layer decoder extrapolated to 32 layers):

    python bench/kernels.py --cpu [--threads 2] [--sizes 576,2880] [--decoder-layers 1]

Every row times both paths in the same run on the same inputs (bf16 tokens as a
projector emits them, a 4-token "noun" text, alpha 0.75) and says whether the two
returned the same index set.

Per method (``--methods``, default every method; ``--no-methods`` skips): one request
through a LLaVA-1.5-7B-shaped model with random bf16 weights (CLIP-L/14-336 tower, 24
layers, feature layer -2; Llama-2-7B decoder) built from its config on the device, an
image of 576 patches and a prompt of ``--text-tokens`` text tokens, pruned to
``--budget``:

* ``encode``: the tower, the method's selection and the projector
  (``pipeline.prune_image``; DCP prunes inside the tower);
* ``prefill``: the decoder over the prompt with the kept tokens. Encoder-side methods
  run transformers' decoder (SDPA) on the shorter prompt, as vLLM would; methods inside
  the LLM run the explicit layer loop (``llm_loop.PrunedDecoder``, pruned rows removed),
  whose vanilla row (``vanilla-loop``) is their baseline;
* each row's ratio to vanilla (encode + prefill), and the limit: the same decoder on a
  prompt as long as the pruned one with no tower (``limit``).

    python bench/kernels.py --methods resprune,dcp,fastv --budget 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
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


# ------------------------------------------------------------- per-method prefill
ALL_METHODS = ("resprune", "divprune", "visionzip", "random", "dcp", "polymorphic", "fastv",
               "rcp")


def llava_config(tiny: bool = False):
    """LLaVA-1.5-7B's shapes (``tiny``: the same layout, small enough for a CPU smoke run)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4)
        text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, vocab_size=1024)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16)
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768,
                                       hidden_act="quick_gelu", **vision),
        text_config=LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, **text),
        image_token_index=text["vocab_size"] - 64, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build_llava(cfg, device, dtype):
    """Random weights of ``cfg``'s shapes, made on ``device`` in ``dtype``."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class MethodBench:
    """One request: ``images`` images of 576 patches each, then ``text_tokens`` text
    tokens (several images keep a 7B prefill compute-bound on a GPU: one image's 616
    tokens take about as long as launching the 32 layers' kernels)."""

    def __init__(self, model, text_tokens: int, images: int, dev):
        from vllm_vtprune import llm_loop
        from vllm_vtprune.families import llava as family

        cfg = model.config
        vm = model.model.vision_tower
        self.tower = family.HfClipTower(getattr(vm, "vision_model", vm), cfg.vision_config,
                                        cfg.vision_feature_layer)
        self.project = model.model.multi_modal_projector
        self.lm = model.model.language_model
        self.decoder = llm_loop.PrunedDecoder(self.lm, model.lm_head)
        self.num_patches = self.tower.grid[0] * self.tower.grid[1]
        embed = model.get_input_embeddings()
        gen = torch.Generator().manual_seed(0)
        size = cfg.vision_config.image_size
        self.pixels = torch.randn(images, 3, size, size, generator=gen).to(dev)
        ids = torch.randint(3, cfg.image_token_index, (text_tokens,), generator=gen).to(dev)
        with torch.no_grad():
            self.before, self.after = embed(ids[:5]), embed(ids[5:])
            self.nouns = embed(ids[-4:])  # what a question's nouns would give ResPrune/DCP

    @torch.no_grad()
    def encode(self, spec) -> list:
        """Each image pruned on its own, as the vLLM model class does."""
        from vllm_vtprune import pipeline

        return [pipeline.prune_image(self.tower, self.project, self.pixels[i:i + 1], spec,
                                     self.nouns) for i in range(self.pixels.shape[0])]

    @torch.no_grad()
    def prefill(self, spec, images: list):
        """Last hidden row; and the visual tokens each decoder layer holds, averaged.
        ``images``: each image's tokens [K_i, D]."""
        from vllm_vtprune import llm_loop, pipeline, registry

        embeds = torch.cat([self.before, *[t.to(self.before.dtype) for t in images],
                            self.after])
        n = sum(t.shape[0] for t in images)
        if spec == "loop":
            return self.decoder.prefill(embeds, llm_loop.Plan())[0], n
        if spec is not None and pipeline.acts_in_llm(spec):
            spans, at = [], self.before.shape[0]
            for t in images:
                spans.append((at, at + t.shape[0]))
                at += t.shape[0]
            plan = registry.get(spec.method).llm_plan(spec, spans, self.decoder.num_layers,
                                                      self.num_patches)
            logits, _ = self.decoder.prefill(embeds, plan)
            counts = plan.visual_counts or [n] * self.decoder.num_layers
            return logits, sum(counts) / len(counts)
        return self.lm(inputs_embeds=embeds[None]).last_hidden_state[0, -1], n


def method_specs(names, budget: int, rcp_ckpt: str | None):
    from vllm_vtprune import spec as spec_mod

    out = []
    for name in names:
        extra = f",ckpt={rcp_ckpt}" if name == "rcp" else ""
        out.append((name, spec_mod.parse(f"{name}:{budget}{extra}")))
    return out


def rcp_modules_file(cfg, path: str) -> str:
    """RCP modules at their initialisation for ``cfg``'s decoder (masks; adapters identity)."""
    from vllm_vtprune.methods import rcp

    modules = rcp.build_modules(cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers)
    rcp.save_checkpoint(modules, path)
    return path


def bench_methods(args, dev, repeats: int) -> list[dict]:
    import tempfile

    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = llava_config(args.tiny)
    model = build_llava(cfg, dev, dtype)
    bench = MethodBench(model, args.text_tokens, args.images, dev)
    names = [m for m in args.methods.split(",") if m]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = rcp_modules_file(cfg, f"{tmp}/rcp.safetensors") if "rcp" in names else None
        t_enc, images = timeit(lambda: bench.encode(None), dev, repeats)
        full = [p.tokens for p in images]
        t_pre, _ = timeit(lambda: bench.prefill(None, full), dev, repeats)
        t_loop, _ = timeit(lambda: bench.prefill("loop", full), dev, repeats)
        vanilla = t_enc + t_pre
        n_full = sum(t.shape[0] for t in full)
        rows.append(dict(method="vanilla", kept=n_full, layer_avg=n_full,
                         encode_ms=t_enc * 1e3, prefill_ms=t_pre * 1e3))
        rows.append(dict(method="vanilla-loop", kept=n_full, layer_avg=n_full,
                         encode_ms=t_enc * 1e3, prefill_ms=t_loop * 1e3))
        del images, full
        for name, spec in method_specs(names, args.budget, ckpt):
            t_enc, images = timeit(lambda: bench.encode(spec), dev, repeats)
            kept = [p.tokens for p in images]
            t_pre, (_, avg) = timeit(lambda: bench.prefill(spec, kept), dev, repeats)
            rows.append(dict(method=name, spec=str(spec), kept=sum(t.shape[0] for t in kept),
                             layer_avg=avg, encode_ms=t_enc * 1e3, prefill_ms=t_pre * 1e3))
            del images, kept
        k = args.budget * args.images
        limit_feats = [bench.before.new_zeros(k, bench.before.shape[1])]
        t_lim, _ = timeit(lambda: bench.prefill(None, limit_feats), dev, repeats)
        rows.append(dict(method="limit", kept=k, layer_avg=k, encode_ms=0.0,
                         prefill_ms=t_lim * 1e3))
    loop_total = rows[1]["encode_ms"] + rows[1]["prefill_ms"]
    for row in rows:
        total = row["encode_ms"] + row["prefill_ms"]
        in_llm = row["method"] in ("fastv", "polymorphic", "rcp", "vanilla-loop")
        row["total_ms"] = total
        row["speedup"] = (loop_total if in_llm else vanilla * 1e3) / total
    print(f"\nper method, budget {args.budget} per image, {args.images} image(s), "
          f"{args.text_tokens} text tokens, "
          f"{'tiny' if args.tiny else 'LLaVA-1.5-7B'} shapes, {dtype}; "
          "speed-up against vanilla (methods inside the LLM: against vanilla-loop)")
    print(f"{'method':>12} {'kept':>5} {'layer avg':>9} {'encode ms':>10} {'prefill ms':>11} "
          f"{'total ms':>9} {'speed-up':>9}")
    for r in rows:
        print(f"{r['method']:>12} {r['kept']:>5} {r['layer_avg']:>9.1f} {r['encode_ms']:>10.2f} "
              f"{r['prefill_ms']:>11.2f} {r['total_ms']:>9.2f} {r['speedup']:>8.2f}x", flush=True)
    return rows


def profile_encode(args) -> None:
    """Where one image's encode spends its time, per method (top ops by self time)."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cpu" if args.cpu else "cuda")
    cfg = llava_config(args.tiny)
    model = build_llava(cfg, dev, torch.float32 if args.tiny else torch.bfloat16)
    bench = MethodBench(model, args.text_tokens, 1, dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    for name, spec in method_specs(args.profile.split(","), args.budget, None):
        bench.encode(spec)
        _sync(dev)
        with profile(activities=activities) as prof:
            bench.encode(spec)
            _sync(dev)
        print(f"\n=== {spec}")
        print(prof.key_averages().table(sort_by=sort, row_limit=12))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


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
    ap.add_argument("--methods", default=",".join(ALL_METHODS),
                    help="methods for the per-method prefill ('' skips it)")
    ap.add_argument("--budget", type=int, default=128, help="per-method budget")
    ap.add_argument("--text-tokens", type=int, default=40)
    ap.add_argument("--images", type=int, default=None,
                    help="images per request (default 8 on a GPU, 1 on a CPU)")
    ap.add_argument("--tiny", action="store_true",
                    help="per-method part on a small LLaVA-shaped model (a CPU smoke run)")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--profile", default=None, metavar="METHODS",
                    help="instead: torch.profiler tables of one image's encode per method")
    args = ap.parse_args()

    if args.profile:
        return profile_encode(args)
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
    args.images = args.images or (1 if args.cpu else 8)
    run_kernel = dev.type == "cuda"
    if run_kernel:
        import triton

        from vllm_vtprune.kernels import resprune_order_batch

        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"triton {triton.__version__}")
    else:
        print(f"device CPU ({torch.get_num_threads()} threads), torch {torch.__version__}; "
              "kernel not run (no GPU)")

    report = dict(device=torch.cuda.get_device_name() if run_kernel else "cpu",
                  torch=torch.__version__, kernel=[], methods=[])
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
                report["kernel"].append(dict(n=n, d=args.dim, k=k, torch_ms=t_torch * 1e3,
                                             kernel_ms=t_k * 1e3, same_set=same))
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
    report["decoder_prefill_ms"] = est * 1e3
    del dec, x
    if args.methods:
        report["methods"] = bench_methods(args, dev, repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
