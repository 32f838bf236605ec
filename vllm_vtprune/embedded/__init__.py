"""The embedded model: a small LLaVA-1.5 trained on ShapesVQA, shipped with the package.

``MODEL_DIR`` is a complete Hugging Face checkpoint directory in the public llava-hf key
layout (config, fp16 safetensors, tokenizer with the LLaVA-1.5 chat template, CLIP image
processor), so ``vllm serve`` and ``LlavaForConditionalGeneration.from_pretrained`` load
it exactly as they load ``llava-hf/llava-1.5-7b-hf``.
"""
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "shapes-llava"
#: RCP modules trained on the embedded model (``python -m vllm_vtprune.rcp_train``)
RCP_CHECKPOINT = Path(__file__).resolve().parent / "rcp" / "rcp-128.safetensors"


def model_path() -> str:
    if not (MODEL_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"embedded checkpoint missing at {MODEL_DIR}; run "
            "`python -m vllm_vtprune.embedded.train` to rebuild it")
    return str(MODEL_DIR)


def is_embedded(hf_config) -> bool:
    """Whether a served config is the embedded model's (its shape and vocabulary)."""
    import json

    try:
        ours = json.loads((MODEL_DIR / "config.json").read_text())
    except OSError:
        return False
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else None
    vision = getattr(hf_config, "vision_config", None)
    if text is None or vision is None:
        return False
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    return (all(getattr(text, k, None) == ours["text_config"].get(k) for k in keys)
            and all(getattr(vision, k, None) == ours["vision_config"].get(k)
                    for k in ("hidden_size", "num_hidden_layers", "image_size"))
            and getattr(hf_config, "image_token_index", None) == ours.get("image_token_index"))


def with_shipped_modules(spec, hf_config):
    """``rcp:K`` without ``ckpt=`` on the embedded model: the modules shipped for it.
    Any other model keeps the spec as given (RCP then asks for ``ckpt=``)."""
    if (spec is None or spec.method != "rcp" or spec.value("ckpt") is not None
            or not RCP_CHECKPOINT.exists() or not is_embedded(hf_config)):
        return spec
    return spec.with_option("ckpt", str(RCP_CHECKPOINT))
