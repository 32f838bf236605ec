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
  side.
* **DCP inside the encoder** prunes merged tokens (the merger needs whole 2x2 windows)
  block by block (:class:`BlockTower`): every term of its Eq. 9 is taken per token, its
  four patches side by side (features, keys, values), the attention between tokens
  summed over the key token's patches and averaged over the query token's, and the
  received attention in CLS attention's place. A block sees only the kept patches, each
  at its own rotary position, in its attention window (Qwen2.5-VL) or the image, cut to
  the kept patches.
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


class BlockAttention:
    """A vision block's rotated queries and keys (and values), captured while the block
    runs: vLLM's attention kernel receives them, transformers' attention module gets its
    input, from which they are computed as it computes them."""

    def __init__(self, block):
        self.q = self.k = self.v = self.cu_seqlens = None
        attn = block.attn
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


def _attention_rows(q: Tensor, k: Tensor, cu_seqlens: Tensor):
    """(rows, probs [H, rows, S]) chunk by chunk of queries: the block's softmax(q k^T /
    sqrt(d)) within its attention segments (``cu_seqlens``), in float32."""
    s, _, d = q.shape
    qh, kh = q.float().transpose(0, 1), k.float().transpose(0, 1)  # [H, S, d]
    segment = torch.zeros(s, dtype=torch.int64, device=q.device)
    segment[cu_seqlens[1:-1].long()] = 1
    segment = torch.cumsum(segment, 0)
    for start in range(0, s, PROBE_CHUNK):
        rows = slice(start, min(s, start + PROBE_CHUNK))
        scores = (qh[:, rows] @ kh.transpose(1, 2)) * d ** -0.5
        same = segment[rows, None] == segment[None, :]
        yield rows, torch.softmax(scores.masked_fill(~same, float("-inf")), dim=-1)


def received_attention(q: Tensor, k: Tensor, cu_seqlens: Tensor) -> Tensor:
    """[S]: the attention each patch receives, averaged over heads and over the S queries
    (a query outside the patch's attention segment gives it 0). ``q``, ``k``: [S, H, d]
    as the block's softmax(q k^T / sqrt(d)) sees them."""
    return _attention_summary(q, k, cu_seqlens, None)[0]


def unit_attention(q: Tensor, k: Tensor, cu_seqlens: Tensor,
                   unit: int) -> tuple[Tensor, Tensor]:
    """Over merged tokens of ``unit`` patches each, from one pass of the softmax: [M, M]
    head-averaged attention between tokens (row I, column K: the attention unit I's
    patches pay unit K's, summed over K's and averaged over I's, so each row sums to 1 as
    a token's softmax row does), and [S] :func:`received_attention`."""
    received, between = _attention_summary(q, k, cu_seqlens, unit)
    return between, received


def _attention_summary(q: Tensor, k: Tensor, cu_seqlens: Tensor,
                       unit: int | None) -> tuple[Tensor, Tensor | None]:
    s, heads = q.shape[0], q.shape[1]
    received = torch.zeros(s, dtype=torch.float32, device=q.device)
    between = None
    if unit is not None:
        m = s // unit
        between = torch.zeros(m, m, dtype=torch.float32, device=q.device)
    for rows, probs in _attention_rows(q, k, cu_seqlens):
        received += probs.sum(dim=(0, 1))
        if between is not None:
            to_units = probs.mean(0).view(-1, m, unit).sum(-1)  # [rows, M]
            query_unit = torch.arange(rows.start, rows.stop, device=q.device) // unit
            between.index_add_(0, query_unit, to_units)
    return received / (s * heads), None if between is None else between / unit


def per_token(received: Tensor, unit: int) -> Tensor:
    """[S] per-patch received attention -> [S / unit]: each merged token's, the mean of
    its patches' (what stands in for CLS attention on this family)."""
    return received.view(-1, unit).mean(1)


def side_by_side(per_patch: Tensor, unit: int) -> Tensor:
    """[S, H, d] keys or values -> [H, S / unit, unit * d]: a merged token's patches side
    by side, as the merger puts their features."""
    s, h, d = per_patch.shape
    return per_patch.reshape(s // unit, unit, h, d).permute(2, 0, 1, 3).reshape(
        h, s // unit, unit * d)


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
        last = BlockAttention(self.visual.blocks[-1])
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
        received = per_token(received_attention(last.q, last.k, last.cu_seqlens), unit)
        return Probe(cls_attn=None, keys=side_by_side(last.k, unit)[:, self._order],
                     received=received[self._order])

    @staticmethod
    def agree(flag: bool) -> bool:
        return flag

    def layered(self) -> "BlockTower":
        """This image's encoder one block at a time, for methods inside it."""
        return BlockTower(self)

    def project(self, windows: Tensor) -> Tensor:
        """The merger on [n, 4C] windows -> [n, D] LLM tokens (row by row)."""
        return self.visual.merger(windows.reshape(-1, 1, self.width // self.merge ** 2))


class _Prologue(Exception):
    """The first block's input and keyword arguments: all of the encoder's forward that a
    block-by-block run needs (raised by :class:`_Stop` to end the forward there)."""

    def __init__(self, hidden: Tensor, kwargs: dict):
        super().__init__("vision encoder stopped before its first block")
        self.hidden, self.kwargs = hidden, kwargs


class _Placed(nn.Module):
    """Stands in for the patch embedding: its output, and each patch's index in two more
    columns (``hi * 256 + lo``, exact in any float dtype up to 65,536 patches), which
    the encoder's window reordering carries to the patch's place in the blocks' order.
    (A stand-in, not a hook: vLLM's compilable modules skip their hooks.)"""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the encoder reads its device and dtype off the embedding
            return getattr(self.embed, name)

    def forward(self, x: Tensor) -> Tensor:
        out = self.embed(x)
        if out.shape[0] > 256 * 256:
            raise ValueError(f"vtprune: an image of {out.shape[0]} patches; at most 65536 "
                             "can be pruned inside the Qwen-VL encoder")
        place = torch.arange(out.shape[0], device=out.device)
        return torch.cat([out, torch.stack([place // 256, place % 256], 1).to(out.dtype)], 1)


class _Stop(nn.Module):
    """Stands in for the first block: stops the encoder's forward with its arguments."""

    def forward(self, hidden: Tensor, *args, **kwargs):
        raise _Prologue(hidden, kwargs)


def _prologue(visual, run, pixel_values: Tensor, grid_thw) -> tuple[Tensor, Tensor, dict]:
    """The encoder's own forward up to its first block: that block's input ([S, C], vLLM
    [S, 1, C]), the patch index of each of its rows, and its keyword arguments."""
    embed, first = visual.patch_embed, visual.blocks[0]
    visual.patch_embed, visual.blocks[0] = _Placed(embed), _Stop()
    try:
        run(visual, pixel_values, grid_thw)
    except _Prologue as reached:
        x, kwargs = reached.hidden, reached.kwargs
    else:
        raise RuntimeError("vtprune: the Qwen-VL encoder did not reach its first block")
    finally:
        visual.patch_embed, visual.blocks[0] = embed, first
    place = x.reshape(x.shape[0], -1)[:, -2:].round().long()
    return x[..., :-2].contiguous(), place[:, 0] * 256 + place[:, 1], kwargs


def _like(old, value: int):
    """``value`` as ``old`` is given (a tensor of its dtype and device, or an int)."""
    if isinstance(old, Tensor):
        return torch.tensor(value, dtype=old.dtype, device=old.device)
    return value


class BlockTower:
    """The Qwen2-VL / Qwen2.5-VL encoder one block at a time, for a method inside it
    (DCP-Prune). Its tokens are the merged ones, each a row of its four patches side by
    side ([1, M, 4C], the merger's input), in raster order whatever order the blocks
    see them in. A block runs on the kept tokens' patches only, in the blocks' order
    (Qwen2.5-VL's windows), each keeping its rotary position and its attention segment
    (its window, or the whole image) cut to the kept patches; :meth:`keep` says which
    tokens remain. The encoder's own forward supplies everything up to the first block,
    so both transformers' and vLLM's encoders run through it."""

    prefix = 0

    def __init__(self, encoder: EncoderTower):
        self.visual, self._run = encoder.visual, encoder._run
        self.grid_thw, self.grid = encoder.grid_thw, encoder.grid
        self.unit = encoder.merge ** 2
        self.num_layers = len(self.visual.blocks)
        full = getattr(self.visual, "fullatt_block_indexes", None)
        self._full = None if full is None else {int(i) for i in full}
        if self._full is not None and 0 in self._full:
            raise ValueError("vtprune: a Qwen2.5-VL encoder whose first block attends to "
                             "the whole image cannot be pruned inside (its windows are "
                             "read from that block's arguments)")

    agree = staticmethod(EncoderTower.agree)

    def embed(self, pixel_values: Tensor) -> Tensor:
        x, place, self._kwargs = _prologue(self.visual, self._run, pixel_values,
                                           self.grid_thw)
        self._check_plain(self._kwargs, x.shape[0])
        self._batched = x.dim() == 3  # vLLM's blocks take [S, 1, C]
        raster = place.view(-1, self.unit)[:, 0] // self.unit  # each block slot's token
        self._slot = torch.empty_like(raster)
        self._slot[raster] = torch.arange(raster.shape[0], device=raster.device)
        self._origins = None
        return x.reshape(raster.shape[0], -1)[self._slot][None]

    def keep(self, origins: Tensor) -> None:
        """The tokens the next layers receive: :meth:`embed`'s tokens ``origins``
        (ascending)."""
        self._origins = origins

    def layer(self, i: int, hidden: Tensor) -> Tensor:
        x, order, kwargs = self._block_inputs(i, hidden)
        return self._raster(self.visual.blocks[i](x, **kwargs), order)

    def layer_probed(self, i: int, hidden: Tensor):
        """Block ``i`` once, with the residual stream after its attention and a probe per
        token, as :class:`EncoderTower`'s: the attention its patches receive (averaged
        over heads, queries and the four), the head-averaged token-to-token attention
        (:func:`unit_attention`), its patches' keys and values side by side."""
        from vllm_vtprune.pipeline import Probe

        x, order, kwargs = self._block_inputs(i, hidden)
        block = self.visual.blocks[i]
        qkv, attended = BlockAttention(block), []
        handle = block.attn.register_forward_hook(lambda m, a, out: attended.append(out))
        try:
            out = block(x, **kwargs)
        finally:
            qkv.remove()
            handle.remove()
        back, unit = torch.argsort(order), self.unit
        between, received = unit_attention(qkv.q, qkv.k, qkv.cu_seqlens, unit)
        probe = Probe(cls_attn=None, keys=side_by_side(qkv.k, unit)[:, back],
                      values=side_by_side(qkv.v, unit)[:, back],
                      attn=between[back][:, back], received=per_token(received, unit)[back])
        return self._raster(x + attended[0], order), self._raster(out, order), probe

    def _block_inputs(self, i: int, hidden: Tensor) -> tuple[Tensor, Tensor, dict]:
        """The kept tokens' patches in the blocks' order ([S', C] or [S', 1, C]), which
        row of ``hidden`` each token of that order is, and block ``i``'s arguments cut to
        those patches."""
        origins = self._origins
        if origins is None:
            origins = torch.arange(hidden.shape[1], device=self._slot.device)
        slots = self._slot[origins.to(self._slot.device)]
        order = torch.argsort(slots)
        rows = (slots[order, None] * self.unit
                + torch.arange(self.unit, device=slots.device)).flatten()
        x = hidden[0][order.to(hidden.device)].reshape(rows.shape[0], -1)
        return (x[:, None] if self._batched else x), order.to(hidden.device), self._cut(i, rows)

    def _raster(self, out: Tensor, order: Tensor) -> Tensor:
        units = out.reshape(order.shape[0], -1)
        result = torch.empty_like(units)
        result[order] = units
        return result[None]

    def _segments(self, i: int) -> Tensor:
        """Block ``i``'s attention segments over every patch (blocks' order): the first
        block's (every block's on Qwen2-VL; the windows on Qwen2.5-VL), or one per frame
        for Qwen2.5-VL's full-attention blocks."""
        cu = self._kwargs["cu_seqlens"]
        if self._full is None or i not in self._full:
            return cu
        frames = int(self.grid_thw[0])
        return torch.arange(frames + 1, dtype=cu.dtype, device=cu.device) * (int(cu[-1]) // frames)

    def _cut(self, i: int, rows: Tensor) -> dict:
        """Block ``i``'s keyword arguments for the patches ``rows`` (ascending, blocks'
        order): segments counted over the kept patches (empty ones dropped), rotary
        tables taken at the kept rows."""
        kwargs = dict(self._kwargs)
        full = self._segments(i)
        cu = torch.searchsorted(rows.to(full.device), full.to(torch.int64))
        cu = torch.unique_consecutive(cu).to(full.dtype)
        kwargs["cu_seqlens"] = cu
        if isinstance(kwargs.get("max_seqlen"), (int, Tensor)) and int(kwargs["max_seqlen"]):
            kwargs["max_seqlen"] = _like(kwargs["max_seqlen"], int((cu[1:] - cu[:-1]).max()))
        if "position_embeddings" in kwargs:  # transformers: (cos, sin) [S, d]
            kwargs["position_embeddings"] = tuple(
                t[rows.to(t.device)] for t in kwargs["position_embeddings"])
        for name in ("rotary_pos_emb_cos", "rotary_pos_emb_sin"):  # vLLM
            if name in kwargs:
                kwargs[name] = kwargs[name][rows.to(kwargs[name].device)]
        return kwargs

    @staticmethod
    def _check_plain(kwargs: dict, num_patches: int) -> None:
        if (int(kwargs["cu_seqlens"][-1]) != num_patches
                or kwargs.get("sequence_lengths") is not None):
            raise ValueError("vtprune: this encoder attention backend's sequence offsets "
                             "are not plain patch counts; pruning inside the Qwen-VL "
                             "encoder needs them")


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


# "cls_attention": the attention each token receives stands in for it (EncoderTower,
# BlockTower); "encoder_layers": BlockTower runs the encoder one block at a time
PROVIDES = frozenset({"text", "llm_attention", "cls_attention", "keys", "encoder_layers"})
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
