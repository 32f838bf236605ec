"""`vllm serve ... --vtprune` refuses bad configurations at startup, with a clear message."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_vtprune.embedded import SMALL_MODEL, model_path

VLLM = str(Path(sys.executable).parent / "vllm")


def _serve(model: str, spec: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    return subprocess.run([VLLM, "serve", model, "--vtprune", spec, "--port", "0",
                           "--max-model-len", "512", "--enforce-eager"],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("spec, named", [("resprune:12x", "'12x'"), ("foo:64", "'foo'"),
                                          ("resprune:64,beta=2", "'beta'"),
                                          ("rcp:64", "ckpt=PATH"),
                                          ("fastv:64,layer=8", "1 to 7"),
                                          ("", "none to serve without pruning"),
                                          ("polymorphic:64,layers=3-9-16", "1 to 7"),
                                          ("divprune:64,layers=3-7-16", "'layers'")])
def test_malformed_or_unserved_spec_stops_the_server_at_once(spec, named):
    proc = _serve(model_path(SMALL_MODEL), spec, timeout=120)
    assert proc.returncode == 2
    assert named in proc.stderr
    assert "accepted" in proc.stderr or "served" in proc.stderr


@pytest.fixture(scope="module")
def text_only_checkpoint(tmp_path_factory) -> str:
    """A small Llama (no vision tower) with the embedded model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=92, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path(SMALL_MODEL)).save_pretrained(out)
    return str(out)


def test_unsupported_model_fails_at_startup_naming_what_is_supported(text_only_checkpoint):
    proc = _serve(text_only_checkpoint, "resprune:64")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "model type 'llama'" in output and "supported: LLaVA-1.5" in output
