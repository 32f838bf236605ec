"""Throughput and latency of pruned serving against vanilla vLLM and the token-count limit.

Drives real vLLM through its OpenAI endpoint (streamed chat completions) with a
generated workload (ShapesVQA images and questions, from ``--seed``), for:

* ``vanilla``: stock vLLM (no plugin) on the same model;
* ``limit:K``: text-only prompts exactly as long as the prompts pruned to K (same engine
  as vanilla, same output length): what an image of K tokens could cost at best, with
  no vision tower and no pruning;
* ``none``: the pruning class serving full tokens (its overhead over vanilla, and the
  whole tower's time per image);
* ``METHOD:K``: every method x budget, per request (``mm_processor_kwargs``) on one
  ``vllm serve --vtprune none`` server (methods inside the LLM on one started with
  ``--vtprune fastv:64``, whose masked decoder serves them all).

For each, at each ``--concurrency``: TTFT p50/p90/p99, time per output token, requests/s
and output tokens/s, and the speed-up over vanilla (requests/s) with efficiency =
speed-up / the limit's speed-up at the same budget. Per configuration: prompt tokens,
KV-cache tokens a request holds, the most requests the KV cache holds at once (from the
server's ``vllm:cache_config_info``), the peak KV-cache tokens in use during the run
(``vllm:kv_cache_usage_perc``), and the engine's seconds per image in the vision tower
and in the pruning (``vtprune_image_encode_seconds_total`` and
``vtprune_pruning_seconds_total`` on ``/metrics``).

Every configuration gets images of its own and the servers run without prefix caching,
so no configuration is served from another's cache (``--warm``: the same images for all,
prefix caching on). Nothing is asserted; a table goes to stdout, ``--json`` and
``--plot`` write the figures.

    python bench/latency.py --quick                 # ~4 min here: embedded model
    python bench/latency.py [--model llm150m|embedded|PATH] [--methods ...] [--budgets 128,64]
        [--concurrency 1,4,16,64] [--num-prompts 32] [--output-len 16]
        [--json out.json] [--plot out.png]
    python bench/latency.py --base-url http://gpu-host:8000 ...   # a running server

With ``--base-url`` the server must run the pruning class (``--vtprune SPEC``); vanilla
is then ``vtprune: none`` per request on that server and the limit runs there too.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

QUICK = dict(model="embedded", methods="resprune,divprune", budgets="64", concurrency="1,4",
             num_prompts=8, output_len=8)
SERVED_NAME = "bench"
STARTUP_TIMEOUT_S = 600


# ------------------------------------------------------------------ workload
@dataclasses.dataclass
class Request:
    question: str
    image_url: str | None  # None: a text-only (limit) request
    spec: str | None = None  # per-request vtprune spec
    filler: int = 0  # text-only: words standing in for the visual tokens


def workload(seed: int, num: int, start: int) -> list[tuple[str, str]]:
    """(question, data URL) pairs: ShapesVQA held-out images ``start ..``."""
    from vllm_vtprune.data import shapes_vqa as sv

    out = []
    for image, qa in sv.iter_questions(sv.HELDOUT_SEED + 1000 * seed, num, start=start):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append((qa.question, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()))
    return out


def messages(req: Request) -> list[dict]:
    if req.image_url is None:
        text = " ".join(["the"] * req.filler + [req.question])
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": req.image_url}},
        {"type": "text", "text": req.question}]}]


# ------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``vllm serve`` on a loopback port, stopped (process group) on exit."""

    def __init__(self, model: str, extra: list[str], log_dir: Path, name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        vllm_bin = Path(sys.executable).parent / "vllm"
        self.cmd = [str(vllm_bin), "serve", model, "--served-model-name", SERVED_NAME,
                    "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048",
                    "--enforce-eager", "--limit-mm-per-prompt", '{"image": 1}', *extra]

    def __enter__(self) -> "Server":
        env = dict(os.environ)
        env.pop("VTPRUNE_STATS_FILE", None)  # its own engine figures
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"vllm serve not healthy after {STARTUP_TIMEOUT_S} s ({self.log})")

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


class RemoteServer:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def kv_capacity(text: str) -> int | None:
    """KV-cache tokens the server holds: num_gpu_blocks x block_size (cache_config_info)."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            try:
                return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
            except (KeyError, ValueError):
                return None
    return None


def block_size(text: str) -> int:
    m = re.search(r'vllm:cache_config_info\{[^}]*block_size="(\d+)"', text)
    return int(m.group(1)) if m else 16


def served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


# ------------------------------------------------------------------ one run
async def _one(client, model: str, req: Request, output_len: int) -> dict:
    extra = {"ignore_eos": True, "min_tokens": output_len}
    if req.spec is not None:
        extra["mm_processor_kwargs"] = {"vtprune": req.spec}
    started = time.perf_counter()
    first = last = None
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=messages(req), max_tokens=output_len, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    out = usage.completion_tokens if usage else output_len
    first = first if first is not None else end
    return {"ttft": first - started, "e2e": end - started, "out": out,
            "tpot": ((last or end) - first) / max(1, out - 1),
            "prompt": usage.prompt_tokens if usage else None}


class KvSampler:
    """Peak ``vllm:kv_cache_usage_perc`` while a run is in flight."""

    def __init__(self, url: str):
        self.url, self.peak, self._stop = url, 0.0, False

    async def run(self):
        loop = asyncio.get_running_loop()
        while not self._stop:
            try:
                text = await loop.run_in_executor(None, metrics, self.url)
                self.peak = max(self.peak, metric(text, "vllm:kv_cache_usage_perc"))
            except OSError:
                pass
            await asyncio.sleep(0.25)

    def stop(self):
        self._stop = True


async def run_requests(url: str, requests: list[Request], concurrency: int,
                       output_len: int, desc: str) -> dict:
    from openai import AsyncOpenAI
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=url + "/v1", api_key="bench", timeout=3600, max_retries=0)
    model = served_model(url)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(requests), desc=desc, leave=False, file=sys.stderr)
    sampler = KvSampler(url)
    sampling = asyncio.create_task(sampler.run())

    async def gated(req):
        async with gate:
            r = await _one(client, model, req, output_len)
            bar.update(1)
            return r

    started = time.perf_counter()
    results = await asyncio.gather(*(gated(r) for r in requests))
    wall = time.perf_counter() - started
    sampler.stop()
    await sampling
    bar.close()
    await client.close()
    return summarise(results, wall) | {"kv_usage_peak": sampler.peak}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarise(results: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in results]
    return {"requests": len(results), "wall_s": wall,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p90": percentile(ttft, 0.9),
            "ttft_p99": percentile(ttft, 0.99),
            "tpot": statistics.mean(r["tpot"] for r in results),
            "req_per_s": len(results) / wall,
            "out_tok_per_s": sum(r["out"] for r in results) / wall,
            "prompt_tokens": statistics.mean(r["prompt"] for r in results
                                              if r["prompt"] is not None)}


# ------------------------------------------------------------------ configurations
@dataclasses.dataclass
class Config:
    name: str  # vanilla | limit:K | METHOD:K
    server: str  # which server runs it: vanilla | encoder | in_llm
    spec: str | None
    budget: int | None


def configs(methods: list[str], budgets: list[int]) -> list[Config]:
    from vllm_vtprune import registry

    out = [Config("vanilla", "vanilla", None, None)]
    out += [Config(f"limit:{b}", "vanilla", None, b) for b in budgets]
    if methods:  # the pruning class without pruning: its overhead, the tower's time
        out.append(Config("none", "encoder", "none", None))
    for m in methods:
        where = "in_llm" if m in registry.in_llm() else "encoder"
        out += [Config(f"{m}:{b}", where, f"{m}:{b}", b) for b in budgets]
    return out


def text_tokens(url: str, question: str) -> int:
    """Prompt tokens of a text-only chat request (vLLM's /tokenize)."""
    body = json.dumps({"model": served_model(url), "messages": [
        {"role": "user", "content": question}], "add_generation_prompt": True}).encode()
    req = urllib.request.Request(url + "/tokenize", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["count"]


def requests_for(cfg: Config, pairs, url: str, pruned_prompt: dict[int, float],
                 remote: bool) -> list[Request]:
    if cfg.name.startswith("limit:"):
        # as many filler words as the pruned prompt has tokens beyond the question's
        out = []
        for question, _ in pairs:
            target = round(pruned_prompt[cfg.budget])
            out.append(Request(question, None, "none" if remote else None,
                               max(0, target - text_tokens(url, question))))
        return out
    spec = cfg.spec if cfg.spec is not None else ("none" if remote else None)
    return [Request(q, u, spec) for q, u in pairs]


def measure(cfg: Config, url: str, pairs, args, pruned_prompt, remote) -> dict:
    reqs = requests_for(cfg, pairs, url, pruned_prompt, remote)
    # one request first, off the clock: the first of a kind pays one-off costs (allocations,
    # a method's lazy set-up); its image is not in the workload, so nothing is cached
    warm = requests_for(cfg, workload(args.seed + 1, 1, 0), url, pruned_prompt, remote)
    asyncio.run(run_requests(url, warm, 1, args.output_len, f"{cfg.name} warm-up"))
    before = metrics(url)
    runs = {}
    for c in args.concurrency:
        runs[c] = asyncio.run(run_requests(url, reqs, c, args.output_len, f"{cfg.name} c={c}"))
    after = metrics(url)
    images = (metric(after, "vtprune_images_encoded_total")
              - metric(before, "vtprune_images_encoded_total"))
    per_image = lambda name: ((metric(after, name) - metric(before, name)) / images  # noqa: E731
                              if images else None)
    capacity = kv_capacity(after)
    prompt = statistics.mean(r["prompt_tokens"] for r in runs.values())
    bs = block_size(after)
    held = -(-int(prompt + args.output_len) // bs) * bs  # whole blocks
    return {"config": cfg.name, "spec": cfg.spec, "budget": cfg.budget,
            "prompt_tokens": prompt, "kv_tokens_per_request": held,
            "kv_capacity_tokens": capacity,
            "max_requests_in_kv": capacity // held if capacity else None,
            "kv_tokens_peak": {c: r["kv_usage_peak"] * capacity if capacity else None
                               for c, r in runs.items()},
            "encode_s_per_image": per_image("vtprune_image_encode_seconds_total"),
            "prune_s_per_image": per_image("vtprune_pruning_seconds_total"),
            "runs": runs}


def with_ratios(results: list[dict]) -> None:
    """Speed-up over vanilla (requests/s, same concurrency) and efficiency = speed-up /
    the same budget's limit speed-up; at concurrency 1 also ``efficiency_enc``, against
    the limit plus vanilla's encoder stage per request (the tower and projection a pruning
    method cannot drop, measured on the ``none`` configuration)."""
    by_name = {r["config"]: r for r in results}
    vanilla = by_name["vanilla"]["runs"]
    encoder_s = (by_name.get("none") or {}).get("encode_s_per_image")
    for r in results:
        limit = by_name.get(f"limit:{r['budget']}")
        for c, run in r["runs"].items():
            run["speedup"] = run["req_per_s"] / vanilla[c]["req_per_s"]
            run["ttft_speedup"] = vanilla[c]["ttft_p50"] / run["ttft_p50"]
            if limit is not None and not r["config"].startswith(("limit:", "vanilla")):
                lim = limit["runs"][c]["req_per_s"] / vanilla[c]["req_per_s"]
                run["efficiency"] = run["speedup"] / lim
                if c == 1 and encoder_s:
                    run["efficiency_enc"] = run["req_per_s"] * (
                        1.0 / limit["runs"][c]["req_per_s"] + encoder_s)


# ------------------------------------------------------------------ output
def table(results: list[dict], concurrency: list[int]) -> str:
    lines = []
    for c in concurrency:
        lines += [f"\nconcurrency {c}",
                  "| config | TTFT p50 / p90 / p99 ms | TPOT ms | req/s | out tok/s "
                  "| x vanilla | efficiency (vs limit + encoder) |", "|---|---|---|---|---|---|---|"]
        for r in results:
            run = r["runs"][c]
            eff = f"{run['efficiency']:.2f}" if "efficiency" in run else ""
            if "efficiency_enc" in run:
                eff += f" ({run['efficiency_enc']:.2f})"
            lines.append(
                f"| {r['config']} | {run['ttft_p50'] * 1e3:.0f} / {run['ttft_p90'] * 1e3:.0f} / "
                f"{run['ttft_p99'] * 1e3:.0f} | {run['tpot'] * 1e3:.1f} | {run['req_per_s']:.2f} "
                f"| {run['out_tok_per_s']:.1f} | {run['speedup']:.2f} | {eff} |")
    lines += ["", "| config | prompt tokens | KV tokens / request | requests the KV cache holds "
              "| peak KV tokens in use (sampled) | encode ms / image | pruning ms / image |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        ms = lambda v: f"{v * 1e3:.1f}" if v is not None else ""  # noqa: E731
        peak = max((v for v in r["kv_tokens_peak"].values() if v is not None), default=None)
        lines.append(f"| {r['config']} | {r['prompt_tokens']:.0f} | {r['kv_tokens_per_request']} "
                     f"| {r['max_requests_in_kv'] or ''} | {'' if peak is None else f'{peak:.0f}'} "
                     f"| {ms(r['encode_s_per_image'])} | {ms(r['prune_s_per_image'])} |")
    return "\n".join(lines)


def plot(results: list[dict], concurrency: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = _colours(results)
    budgets = sorted({r["budget"] for r in results if r["budget"] is not None}, reverse=True)
    for r in results:
        name = r["config"].split(":")[0]
        style = ("-", ":", "-.", "--")[budgets.index(r["budget"]) % 4] if r["budget"] else "-"
        width = 2.5 if name in ("vanilla", "limit") else 1.2
        left.plot(concurrency, [r["runs"][c]["req_per_s"] for c in concurrency], style,
                  color=colours[name], marker="o", linewidth=width, label=r["config"])
    left.set_xscale("log")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set(xlabel="concurrent requests", ylabel="requests / s", title="throughput",
             xticks=concurrency, xticklabels=[str(c) for c in concurrency])
    left.legend(fontsize=7)
    c0 = concurrency[0]
    vanilla = next(r for r in results if r["config"] == "vanilla")["runs"][c0]["ttft_p50"]
    right.axhline(vanilla * 1e3, color="black", linewidth=2, label="vanilla")
    groups: dict[str, list] = {}
    for r in results:
        if r["budget"] is not None:
            groups.setdefault(r["config"].split(":")[0], []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["budget"])
        right.plot([r["budget"] for r in rs], [r["runs"][c0]["ttft_p50"] * 1e3 for r in rs],
                   "--" if name == "limit" else "-", color=colours[name], marker="o",
                   linewidth=2.5 if name == "limit" else 1.2, label=name)
    right.set(xlabel="visual tokens (budget)", ylabel="TTFT p50 ms",
              title=f"time to first token, concurrency {c0}")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _colours(results: list[dict]) -> dict[str, str]:
    """One colour per method (its budgets differ by line style); vanilla black, the
    limit grey."""
    import matplotlib

    names = list(dict.fromkeys(r["config"].split(":")[0] for r in results))
    palette = iter(matplotlib.colormaps["tab10"].colors)
    fixed = {"vanilla": "black", "limit": "grey", "none": "tab:brown"}
    return {n: fixed.get(n) or matplotlib.colors.to_hex(next(palette)) for n in names}


# ------------------------------------------------------------------ main
def model_path(name: str) -> str:
    if name == "embedded":
        from vllm_vtprune.embedded import model_path as embedded

        return embedded()
    if name == "llm150m":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from in_llm import MODEL_DIR, build_model

        return str(build_model(MODEL_DIR))
    return name


def parse_args(argv=None):
    from vllm_vtprune import registry

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llm150m",
                   help="llm150m (generated LLaVA, ~150M-parameter LLM), embedded, or a path")
    p.add_argument("--base-url", default=None, help="measure this running server instead")
    p.add_argument("--methods", default=",".join(m for m in registry.served()
                                                 if m not in registry.in_llm()),
                   help="default: every method served at the encoder")
    p.add_argument("--budgets", default="128,64")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm", action="store_true",
                   help="the same images for every configuration, prefix caching on")
    p.add_argument("--quick", action="store_true",
                   help="embedded model, resprune and divprune at 64, concurrency 1 and 4, "
                        "8 prompts of 8 output tokens")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only draw --plot from a JSON this bench wrote")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        registry.check_served(m)
    args.budgets = [int(b) for b in str(args.budgets).split(",")]
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    return args


def servers_needed(cfgs: list[Config], remote: bool) -> list[str]:
    if remote:
        return ["remote"]
    return [s for s in ("vanilla", "encoder", "in_llm") if any(c.server == s for c in cfgs)]


def server_for(kind: str, args, model: str, log_dir: Path):
    if kind == "remote":
        return RemoteServer(args.base_url)
    cache = [] if args.warm else ["--no-enable-prefix-caching"]
    extra = {"vanilla": cache, "encoder": ["--vtprune", "none", *cache],
             "in_llm": ["--vtprune", "fastv:64"]}[kind]
    return Server(model, extra, log_dir, kind)


def replot(path: str, out: str) -> None:
    data = json.loads(Path(path).read_text())
    results = data["results"]
    for r in results:  # JSON keys are strings
        r["runs"] = {int(c): v for c, v in r["runs"].items()}
    plot(results, [int(c) for c in data["args"]["concurrency"]], out)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        replot(args.replot, args.plot or args.replot.replace(".json", ".png"))
        return
    remote = args.base_url is not None
    model = None if remote else model_path(args.model)
    cfgs = configs(args.methods, args.budgets)
    log_dir = Path(tempfile.mkdtemp(prefix="vtprune-bench-"))
    print(f"model: {args.base_url or model}; {args.num_prompts} prompts x "
          f"{args.output_len} output tokens; concurrency {args.concurrency}; logs in {log_dir}",
          file=sys.stderr)
    pairs_of = {c.name: workload(args.seed, args.num_prompts,
                                 0 if args.warm else 10_000 + 1000 * i)
                for i, c in enumerate(cfgs)}
    results: dict[str, dict] = {}
    pruned_prompt: dict[int, float] = {}
    # pruned configurations run first: each limit copies its budget's prompt length
    order = {"encoder": 0, "in_llm": 1, "vanilla": 2, "remote": 0}
    for kind in sorted(servers_needed(cfgs, remote), key=order.get):
        with server_for(kind, args, model, log_dir) as server:
            mine = [c for c in cfgs if remote or c.server == kind]
            mine.sort(key=lambda c: c.name.startswith(("vanilla", "limit:")))
            for cfg in mine:
                if cfg.name.startswith("limit:") and cfg.budget not in pruned_prompt:
                    pruned_prompt[cfg.budget] = _pruned_prompt(server.url, cfg.budget,
                                                               pairs_of[cfg.name], remote)
                results[cfg.name] = measure(cfg, server.url, pairs_of[cfg.name], args,
                                            pruned_prompt, remote)
                if cfg.budget is not None and not cfg.name.startswith("limit:"):
                    pruned_prompt.setdefault(cfg.budget, results[cfg.name]["prompt_tokens"])
    ordered = [results[c.name] for c in cfgs]
    with_ratios(ordered)
    print(table(ordered, args.concurrency))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                               "results": ordered}, indent=2, default=str))
    if args.plot:
        plot(ordered, args.concurrency, args.plot)
        print(f"plot: {args.plot}")


def _pruned_prompt(url: str, budget: int, pairs, remote: bool) -> float:
    """Prompt tokens of an image request pruned to ``budget`` (``random``, the cheapest
    selection; the count does not depend on the method), when no method ran at it."""
    if not remote:
        raise RuntimeError(f"limit:{budget} needs a pruned run at {budget} first")
    r = asyncio.run(run_requests(url, [Request(pairs[0][0], pairs[0][1], f"random:{budget}")],
                                 1, 1, f"prompt length at {budget}"))
    return r["prompt_tokens"]


if __name__ == "__main__":
    main()
