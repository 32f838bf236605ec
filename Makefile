# Everything runs in .venv, created by scripts/setup.sh (real vLLM for CPU, pinned).
VENV  ?= .venv
PY    := $(VENV)/bin/python
PORT  ?= 8000
SPEC  ?= resprune:64
# On CPU vLLM reserves KV-cache space in host RAM (GiB); its GPU default would take 92 %.
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: setup serve test test-fast bench-accuracy bench-latency bench-kernels train

setup:
	@bash scripts/setup.sh

# Serve the embedded ShapesVQA LLaVA-1.5 with pruning on an OpenAI-compatible port.
serve: setup
	$(VENV)/bin/vllm serve $$($(PY) -m vllm_vtprune.cli model-path) --vtprune $(SPEC) \
	  --served-model-name shapes-llava --port $(PORT) --max-model-len 2048 --enforce-eager

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# Unit tests only (no vLLM engine started).
test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not vllm" tests

bench-accuracy: setup
	$(PY) bench/accuracy.py

bench-latency: setup
	$(PY) bench/latency.py

bench-kernels: setup
	$(PY) bench/kernels.py

train: setup
	$(PY) -m vllm_vtprune.embedded.train --out vllm_vtprune/embedded/shapes-llava
