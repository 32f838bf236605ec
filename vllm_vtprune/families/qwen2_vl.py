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
  Qwen2.5-VL, Sec. IV-A1). Where a method reads CLS attention (VisionZip's dominant
  tokens, Polymorphic's stage 1) it gets the attention each merged token's patches
  receive in the last block, averaged over heads and queries: Polymorphic's own choice
  on Qwen2-VL ("Polymorphic ...", Sec. 4.1: "the averaged attention scores across all
  visual tokens"), and the substitute VisPruner's authors name for VisionZip on
  Qwen2.5-VL, the attention merged as the merger merges the patches. VisionZip's keys
  are the last block's (after its rotary embedding), a merged token's four side by
  side. DCP, which needs the tower layer by layer, is not served on this family yet.
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
    """Stands in for the merger: every 2x2 window's patches side by side, unprojected,
    and the window's place in the blocks' order in two more columns (``hi * 256 + lo``,
    exact in any float dtype), which the encoder's own reordering (Qwen2.5-VL's windows)
    then carries to the window's place in the output."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        units = x.reshape(-1, self.width)
        place = torch.arange(units.shape[0], device=units.device)
        return torch.cat([units, torch.stack([place // 256, place % 256], 1).to(units.dtype)], 1)


@contextlib.contextmanager
def _without_merger(visual, width: int):
    merger = visual.merger
    visual.merger = _Windows(width)
    try:
        yield
    finally:
        visual.merger = merger


#: query rows per softmax chunk of the received-attention probe (memory: heads x chunk x
#: patches floats, 270 MB for 16,384 patches of 16 heads)
PROBE_CHUNK = 256


class LastAttention:
    """The last vision block's rotated queries and keys (and values), captured while the
    encoder runs once: vLLM's attention kernel receives them, transformers' attention
    module gets its input, from which they are computed as it computes them."""

    def __init__(self, visual):
        self.q = self.k = self.v = self.cu_seqlens = None
        attn = visual.blocks[-1].attn
        kernel = getattr(attn, "attn", None)
        if isinstance(kernel, nn.Module):  # vLLM: query, key, value [1, S, H, d]
            self._handle = kernel.register_forward_pre_hook(self._from_kernel, with_kwargs=True)
        else:
            self._attn = attn
            self._handle = attn.register_forward_pre_hook(self._from_module, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _from_kernel(self, module, args, kwargs):
        self.q, self.k, self.v = (kwargs[n][0] for n in ("query", "key", "value"))
        self.cu_seqlens = kwargs["cu_seqlens"]

    def _from_module(self, module, args, kwargs):
        import sys

        hidden = args[0] if args else kwargs["hidden_states"]
        s = hidden.shape[0]
        q, k, v = module.qkv(hidden).reshape(s, 3, module.num_heads, -1).permute(
            1, 0, 2, 3).unbind(0)
        rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        cos, sin = kwargs["position_embeddings"]
        self.q, self.k = rotate(q, k, cos, sin)
        self.v = v
        self.cu_seqlens = kwargs["cu_seqlens"]


def received_attention(q: Tensor, k: Tensor, cu_seqlens: Tensor) -> Tensor:
    """[S]: the attention each patch receives, averaged over heads and over the S queries
    (a query outside the patch's attention segment gives it 0). ``q``, ``k``: [S, H, d]
    as the block's softmax(q k^T / sqrt(d)) sees them."""
    s, _, d = q.shape
    qh, kh = q.float().transpose(0, 1), k.float().transpose(0, 1)  # [H, S, d]
    segment = torch.zeros(s, dtype=torch.int64, device=q.device)
    segment[cu_seqlens[1:-1].long()] = 1
    segment = torch.cumsum(segment, 0)
    total = torch.zeros(s, dtype=torch.float32, device=q.device)
    for start in range(0, s, PROBE_CHUNK):
        rows = slice(start, min(s, start + PROBE_CHUNK))
        scores = (qh[:, rows] @ kh.transpose(1, 2)) * d ** -0.5
        same = segment[rows, None] == segment[None, :]
        probs = torch.softmax(scores.masked_fill(~same, float("-inf")), dim=-1)
        total += probs.sum(dim=(0, 1))
    return total / (s * qh.shape[0])


class EncoderTower:
    """The whole Qwen2-VL / Qwen2.5-VL vision encoder as one layer, for methods at its
    output: ``embed`` runs every block on one image and returns its tokens' windows
    [1, N, 4C] in the order the LLM reads them (Qwen2.5-VL's window reordering undone by
    the encoder itself). Its probe stands in for CLS attention, which the tower has
    none of: the attention each merged token's four patches receive in the last block,
    averaged over heads and queries (:func:`received_attention`), and their keys side by
    side, as the merger puts their features."""

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
        last = LastAttention(self.visual)
        try:
            with _without_merger(self.visual, self.width):
                out = self._run(self.visual, pixel_values, self.grid_thw)
        finally:
            last.remove()
        places = out[:, self.width:].round().long()
        self._last, self._order = last, places[:, 0] * 256 + places[:, 1]
        return out[:, :self.width].reshape(1, -1, self.width)

    def layer(self, i: int, hidden: Tensor) -> Tensor:
        return hidden

    def probe(self, i: int, hidden: Tensor, full: bool = False):
        """The last block's probe for the image :meth:`embed` ran last, per merged
        token in output order: ``cls_attn`` None, ``received`` [N], ``keys`` [H, N, 4d]."""
        from vllm_vtprune.pipeline import Probe

        last, unit = self._last, self.merge ** 2
        received = received_attention(last.q, last.k, last.cu_seqlens)
        received = received.view(-1, unit).mean(1)[self._order]
        s, h, d = last.k.shape
        keys = last.k.view(s // unit, unit, h, d).permute(2, 0, 1, 3).reshape(h, s // unit,
                                                                              unit * d)
        return Probe(cls_attn=None, keys=keys[:, self._order], received=received)

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


# "cls_attention": the attention each token receives stands in for it (EncoderTower)
PROVIDES = frozenset({"text", "llm_attention", "cls_attention", "keys"})
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
