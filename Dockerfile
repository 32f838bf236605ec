# GPU deployment: the official vLLM OpenAI server image, same vLLM version as tested
# (0.32.0), plus this package. Example:
#   docker build -t vllm-vtprune .
#   docker run --gpus all -p 8000:8000 vllm-vtprune \
#       llava-hf/llava-1.5-7b-hf --vtprune resprune:128
# Two GPUs, tensor parallel (every rank applies rank 0's decisions):
#   docker run --gpus all --ipc=host -p 8000:8000 vllm-vtprune \
#       llava-hf/llava-v1.6-34b-hf --vtprune resprune:0.25 --tensor-parallel-size 2
# or two engines, data parallel (any method):
#   docker run --gpus all --ipc=host -p 8000:8000 vllm-vtprune \
#       llava-hf/llava-1.5-7b-hf --vtprune resprune:128 --data-parallel-size 2
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
