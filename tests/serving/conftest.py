"""Real vLLM (CPU) on the embedded checkpoint: a `vllm serve` process and an offline engine.

Nothing here is mocked: the server is the `vllm` command scripts/setup.sh installs, the
offline engine is `vllm.LLM`, both loading the checkpoint shipped in the package.
"""
from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_vtprune.embedded import SMALL_MODEL, model_path

SERVER_SPEC = "resprune:64"
MODEL_NAME = "shapes-llava"
STARTUP_TIMEOUT_S = 300


def pytest_collection_modifyitems(items):
    # The hook sees every collected test, not only this folder's.
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(question: str, images) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image_url(im)}} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


def _wait_healthy(proc, url: str, log: Path) -> None:
    import urllib.request

    deadline = time.time() + STARTUP_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"vllm serve not healthy after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


def offline_llm(model: str | None = None, max_model_len: int = 2048, **kwargs):
    """`vllm.LLM` on ``model`` (the embedded one by default), float32, eager, two images
    per prompt. The engine core runs in this process: the trace file and the test share
    it, and no spawned process has to re-import pytest's __main__."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    return LLM(model=model or model_path(SMALL_MODEL), enforce_eager=True, max_model_len=max_model_len,
               dtype="float32", limit_mm_per_prompt={"image": 2}, **kwargs)


def in_llm_offline_llm(model: str, architecture: str, spec: str, max_model_len: int):
    """:func:`offline_llm` on ``model`` as a server started with the in-LLM ``spec``
    (masked decoder; chunked prefill and the prefix cache off, as it requires)."""
    return offline_llm(model, max_model_len=max_model_len, enable_chunked_prefill=False,
                       enable_prefix_caching=False,
                       hf_overrides={"architectures": [architecture], "vtprune": spec})


def shutdown(llm) -> None:
    """Stop an offline engine before the next one starts (two would share the CPUs)."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def trace_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trace") / "kept.jsonl"


@pytest.fixture(scope="session")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server") / "serve.log"


@contextlib.contextmanager
def serving(log: Path, trace: Path, *extra: str, spec: str = SERVER_SPEC,
            model: str | None = None, max_model_len: int = 2048):
    """`vllm serve MODEL --vtprune SPEC [extra]` on a free loopback port (the embedded
    model by default); yields its URL."""
    port = free_port()
    vllm_bin = Path(sys.executable).parent / "vllm"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VTPRUNE_TRACE=str(trace))
    cmd = [str(vllm_bin), "serve", model or model_path(SMALL_MODEL), "--vtprune", spec,
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(max_model_len), "--enforce-eager", "--dtype", "float32",
           "--limit-mm-per-prompt", '{"image": 3}', *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def server(server_log, trace_file):
    """`vllm serve EMBEDDED --vtprune resprune:64` on a free loopback port."""
    with serving(server_log, trace_file) as url:
        yield url


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path(SMALL_MODEL))


@pytest.fixture(scope="session")
def reference():
    from vllm_vtprune.hf import HfReference

    return HfReference.load(model_path(SMALL_MODEL))
