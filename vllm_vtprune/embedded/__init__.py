"""The embedded models: small LLaVA-1.5s trained on ShapesVQA, shipped with the package.

Each is a complete Hugging Face checkpoint directory in the public llava-hf key layout
(config, fp16 safetensors, tokenizer with the LLaVA-1.5 chat template, CLIP image
processor), so ``vllm serve`` and ``LlavaForConditionalGeneration.from_pretrained`` load
it exactly as they load ``llava-hf/llava-1.5-7b-hf``:

* ``shapes-llava-v2`` (the default: ``make serve``, the benches): a 24-layer CLIP tower
  read at layer -2 and a 16-layer LLM, so that methods acting inside the tower or at
  the papers' decoder layers act where they do on LLaVA-1.5-7B;
* ``shapes-llava`` (v1: 4-layer tower, 8-layer LLM): about six times cheaper per
  request, what most vLLM integration tests serve.

RCP modules trained on an embedded model ship as ``rcp/<model name>.safetensors``; they
serve ``rcp:K`` without ``ckpt=`` on that model (:func:`with_shipped_modules`).
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = "shapes-llava-v2"
SMALL_MODEL = "shapes-llava"
MODELS = (DEFAULT_MODEL, SMALL_MODEL)
RCP_DIR = ROOT / "rcp"


def model_dir(name: str | None = None) -> Path:
    """The directory of embedded model ``name`` (default: :data:`DEFAULT_MODEL`)."""
    name = name or DEFAULT_MODEL
    if name not in MODELS:
        raise ValueError(f"unknown embedded model {name!r}; accepted: {', '.join(MODELS)}")
    return ROOT / name


def model_path(name: str | None = None) -> str:
    path = model_dir(name)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"embedded checkpoint missing at {path}; run "
            "`python -m vllm_vtprune.embedded.train` to rebuild it")
    return str(path)


def rcp_checkpoint(name: str | None = None) -> Path:
    """Where RCP modules trained on embedded model ``name`` ship (may not exist)."""
    return RCP_DIR / f"{model_dir(name).name}.safetensors"


def _same_shape(hf_config, ours: dict) -> bool:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else None
    vision = getattr(hf_config, "vision_config", None)
    if text is None or vision is None:
        return False
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    return (all(getattr(text, k, None) == ours["text_config"].get(k) for k in keys)
            and all(getattr(vision, k, None) == ours["vision_config"].get(k)
                    for k in ("hidden_size", "num_hidden_layers", "image_size"))
            and getattr(hf_config, "image_token_index", None) == ours.get("image_token_index"))


def embedded_name(hf_config) -> str | None:
    """Which embedded model a served config is (by shape and vocabulary), or None."""
    for name in MODELS:
        try:
            ours = json.loads((ROOT / name / "config.json").read_text())
        except OSError:
            continue
        if _same_shape(hf_config, ours):
            return name
    return None


def is_embedded(hf_config) -> bool:
    """Whether a served config is one of the embedded models'."""
    return embedded_name(hf_config) is not None


def with_shipped_modules(spec, hf_config):
    """``rcp:K`` without ``ckpt=`` on an embedded model: the modules shipped for it.
    Any other model keeps the spec as given (RCP then asks for ``ckpt=``)."""
    if spec is None or spec.method != "rcp" or spec.value("ckpt") is not None:
        return spec
    name = embedded_name(hf_config)
    if name is None or not rcp_checkpoint(name).exists():
        return spec
    return spec.with_option("ckpt", str(rcp_checkpoint(name)))
