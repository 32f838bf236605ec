# GPU deployment: the official vLLM OpenAI server image, same vLLM version as tested
# (0.32.0), plus this package. Example:
#   docker build -t vllm-vtprune .
#   docker run --gpus all -p 8000:8000 vllm-vtprune \
#       llava-hf/llava-1.5-7b-hf --vtprune resprune:128
FROM vllm/vllm-openai:v0.32.0

COPY pyproject.toml README.md /opt/vllm-vtprune/
COPY vllm_vtprune /opt/vllm-vtprune/vllm_vtprune
COPY kernels /opt/vllm-vtprune/kernels
COPY server /opt/vllm-vtprune/server
# No dependency resolution: the image's torch, triton and vLLM are the ones to keep.
RUN python3 -m pip install --no-cache-dir --no-deps /opt/vllm-vtprune \
 && python3 -c "import vllm_vtprune.plugin, vllm_vtprune.kernels"

ENTRYPOINT ["vllm", "serve"]
CMD ["llava-hf/llava-1.5-7b-hf", "--vtprune", "resprune:128"]
