#!/usr/bin/env bash
# One request to a pruning vLLM server on a family's checkpoint built by the project:
#   scripts/exchange.sh FAMILY SERVER_SPEC [REQUEST_SPEC] [-- EXTRA vllm serve ARGS]
# FAMILY: llava | llava_next | qwen2_vl | qwen2_5_vl. Builds the checkpoint into
# $VTPRUNE_MODELS/FAMILY (default /tmp/vtprune-models) when missing, serves it with
# `--vtprune SERVER_SPEC`, asks "what color is the square ?" about examples/shapes.jpg
# (with mm_processor_kwargs {"vtprune": REQUEST_SPEC} when given), prints the answer and
# the usage block, and stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
family=$1 server_spec=$2 request_spec=${3:-}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
models=${VTPRUNE_MODELS:-/tmp/vtprune-models}
port=${PORT:-8311}
# LLaVA-1.5 positions stop at 2048; a LLaVA-NeXT image alone can take 2,928 tokens
max_len=$([ "$family" = llava ] && echo 2048 || echo 8192)
py=.venv/bin/python
# on CPU vLLM reserves KV-cache space in host RAM (GiB); its default takes 92 % of it
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
[ -d "$models/$family" ] || $py -m vllm_vtprune.embedded.build --family "$family" --out "$models/$family"
log=$(mktemp)
.venv/bin/vllm serve "$models/$family" --vtprune "$server_spec" --served-model-name m \
  --port "$port" --max-model-len "$max_len" --enforce-eager "$@" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
until curl -sf "localhost:$port/health" >/dev/null; do
  kill -0 $server 2>/dev/null || { tail -20 "$log"; exit 1; }
  sleep 2
done
kwargs=""
[ -n "$request_spec" ] && kwargs=', "mm_processor_kwargs": {"vtprune": "'"$request_spec"'"}'
body=$(mktemp)
cat >"$body" <<JSON
{"model": "m", "max_tokens": 4, "temperature": 0$kwargs,
 "messages": [{"role": "user", "content": [
   {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,$(base64 -w0 examples/shapes.jpg)"}},
   {"type": "text", "text": "what color is the square ?"}]}]}
JSON
echo "\$ vllm serve $models/$family --vtprune $server_spec $*"
echo "\$ curl localhost:$port/v1/chat/completions -d '{... examples/shapes.jpg, \"what color is the square ?\"${request_spec:+, \"mm_processor_kwargs\": {\"vtprune\": \"$request_spec\"\}}}'"
curl -s "localhost:$port/v1/chat/completions" -H 'Content-Type: application/json' -d @"$body" |
  $py -c 'import json, sys; r = json.load(sys.stdin); print(json.dumps({"answer": r["choices"][0]["message"]["content"], "usage": r["usage"]}, indent=1))'
rm -f "$body"
