"""Qwen2-VL (``Qwen/Qwen2-VL-*`` layout): a ViT without CLS token on 14 px patches at the
image's own resolution (its token count depends on the image size), 2-D rotary
positions inside the tower, and a patch merger that turns every 2x2 window of patches
into one LLM token; the LLM places each visual token at its (t, h, w) by M-RoPE.

How vtprune prunes it ("Qwen2-VL: Enhancing Vision-Language Model's Perception of the
World at Any Resolution", arXiv 2409.12191, Sec. 2.1):

* **Units are LLM tokens.** A method chooses among the image's merged tokens (what the
  LLM receives); its "features" are a token's four patches of the tower's last layer
  side by side, and the projector is the merger itself, so a subset projects as the
  whole does.
* **No CLS token.** ResPrune seeds on the largest norm (its paper's choice for
  Qwen2.5-VL, Sec. IV-A1); methods that need CLS attention, keys or the tower's layers
  (VisionZip, Polymorphic, DCP) are not served on this family yet and are refused with
  the methods that are.
* **Inside the LLM** (FastV, RCP) images reach the decoder unpruned and the decisions
  take rows out of the batch; a kept row keeps its own M-RoPE position (the decoder loop
  gathers the [3, T] positions with the rows).
* **Budgets**: a ratio (``resprune:0.25``) keeps that share of each image's tokens, an
  integer caps them; an image with no more tokens than the budget is not pruned.
* **Positions**: kept tokens keep the (t, h, w) of their window in the unpruned grid,
  and the text after an image keeps its unpruned positions
  (:mod:`vllm_vtprune.models.qwen2_vl`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch import nn

from vllm_vtprune.families import Family
from vllm_vtprune.families import llava as llava_family

ARCHITECTURE = "VTPruneQwen2VLForConditionalGeneration"


class _Windows(nn.Module):
    """Stands in for the merger: every 2x2 window's patches side by side, unprojected."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.width)


@contextlib.contextmanager
def _without_merger(visual, width: int):
    merger = visual.merger
    visual.merger = _Windows(width)
    try:
        yield
    finally:
        visual.merger = merger


class EncoderTower:
    """The whole Qwen2-VL / Qwen2.5-VL vision encoder as one opaque layer, for methods at
    its output: ``embed`` runs every block on one image and returns its tokens' windows
    [1, N, 4C] in the order the LLM reads them (Qwen2.5-VL's window reordering undone by
    the encoder itself); no attention probe (no CLS, fused attention)."""

    prefix = 0
    num_layers = 1

    def __init__(self, visual, vision_config, run):
        self.visual = visual
        self.merge = vision_config.spatial_merge_size
        self.width = _embed_dim(vision_config) * self.merge ** 2
        self._run = run  # (visual, pixel_values, grid_thw) -> encoder output
        self.grid_thw: tuple[int, int, int] | None = None

    def for_image(self, grid_thw) -> "EncoderTower":
        bound = EncoderTower.__new__(EncoderTower)
        bound.__dict__.update(self.__dict__, grid_thw=tuple(int(v) for v in grid_thw))
        return bound

    @property
    def grid(self) -> tuple[int, int]:
        t, h, w = self.grid_thw
        return t * h // self.merge, w // self.merge

    def embed(self, pixel_values: Tensor) -> Tensor:
        with _without_merger(self.visual, self.width):
            windows = self._run(self.visual, pixel_values, self.grid_thw)
        return windows.reshape(1, -1, self.width)

    def layer(self, i: int, hidden: Tensor) -> Tensor:
        return hidden

    def probe(self, i: int, hidden: Tensor, full: bool = False):
        raise ValueError("vtprune: the Qwen2-VL vision encoder exposes no attention probe")

    @staticmethod
    def agree(flag: bool) -> bool:
        return flag

    def project(self, windows: Tensor) -> Tensor:
        """The merger on [n, 4C] windows -> [n, D] LLM tokens (row by row)."""
        return self.visual.merger(windows.reshape(-1, 1, self.width // self.merge ** 2))


def _embed_dim(vision_config) -> int:
    return getattr(vision_config, "embed_dim", None) or vision_config.hidden_size


def hf_run(mean, std, rescale: float):
    """transformers' encoder on raw uint8 patches, normalised as vLLM's encoder does
    (``(x * rescale - mean) / std`` per channel in fp32): both serving paths then see the
    same bytes (the random baseline seeds on them)."""
    def run(visual, pixel_values: Tensor, grid_thw) -> Tensor:
        dev = pixel_values.device
        m = torch.tensor(mean, dtype=torch.float32, device=dev)[:, None]
        s = torch.tensor(std, dtype=torch.float32, device=dev)[:, None]
        x = pixel_values.float().view(pixel_values.shape[0], m.shape[0], -1)
        x = ((x * rescale - m) / s).view(pixel_values.shape[0], -1)
        out = visual(x, grid_thw=torch.tensor([grid_thw], device=dev))
        return getattr(out, "pooler_output", out)

    return run


def vllm_run(visual, pixel_values: Tensor, grid_thw) -> Tensor:
    return visual(pixel_values, grid_thw=[list(grid_thw)])


# ---------------------------------------------------------------- config
def matches(hf_config) -> bool:
    return getattr(hf_config, "model_type", None) == "qwen2_vl"


def check(hf_config) -> None:
    return None


def grid(hf_config) -> tuple[int, int]:
    """The largest image's merged grid (the processor's ``max_pixels``) is not known from
    the config, and images differ: each image's own count reaches the in-LLM plans."""
    raise ValueError("vtprune: Qwen2-VL images have no fixed grid")


def _question_ids(tokenizer, prompt_ids: list[int]) -> list[int]:
    return llava_family.question_ids(tokenizer, prompt_ids)


PROVIDES = frozenset({"text", "llm_attention"})
#: ResPrune's text-gate strength on Qwen2.5-VL ("ResPrune: Text-Conditioned Subspace
#: Reconstruction for Visual Token Pruning", arXiv 2603.21105, Sec. IV-A1 and Table V:
#: its denser tokens want a weaker gate than LLaVA's 0.75); Qwen2-VL has the same kind of
#: encoder and takes it too
RESPRUNE_ALPHA = (("resprune", (("alpha", 0.3),)),)
IMAGES = ("merged 2x2 windows of 14 px patches at the image's resolution (count depends "
          "on its size); a ratio keeps that share of each image's tokens, an integer caps "
          "them; kept tokens keep their M-RoPE (t, h, w)")

FAMILY = Family(
    name="Qwen2-VL",
    description="model_type 'qwen2_vl', e.g. Qwen/Qwen2-VL-7B-Instruct",
    architecture=ARCHITECTURE,
    vllm_class="vllm_vtprune.models.qwen2_vl:VTPruneQwen2VLForConditionalGeneration",
    matches=matches,
    check=check,
    grid=grid,
    question_ids=_question_ids,
    provides=PROVIDES,
    images=IMAGES,
    reference="vllm_vtprune.hf:HfQwenReference",
    defaults=RESPRUNE_ALPHA,
)
