"""The embedded model: a small LLaVA-1.5 trained on ShapesVQA, shipped with the package.

``MODEL_DIR`` is a complete Hugging Face checkpoint directory in the public llava-hf key
layout (config, fp16 safetensors, tokenizer with the LLaVA-1.5 chat template, CLIP image
processor), so ``vllm serve`` and ``LlavaForConditionalGeneration.from_pretrained`` load
it exactly as they load ``llava-hf/llava-1.5-7b-hf``.
"""
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "shapes-llava"


def model_path() -> str:
    if not (MODEL_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"embedded checkpoint missing at {MODEL_DIR}; run "
            "`python -m vllm_vtprune.embedded.train` to rebuild it")
    return str(MODEL_DIR)
