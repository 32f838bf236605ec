"""Encoder-side pruning of one image, shared by the vLLM model class and the transformers
reference path.

Both paths wrap their vision tower in their family's :class:`VisionTower` adapter
(embeddings, one call per encoder layer, and a probe that recomputes a layer's attention
and keys, which vLLM's fused encoder attention does not return) and hand it, with their
projector, to :func:`prune_image`. Which method runs and how is looked up in
:mod:`vllm_vtprune.registry`; the method's own module holds its entry point, so the two
serving paths cannot drift apart. Nothing here assumes a CLS token or a square grid:
the tower says how many prefix tokens precede the patches and what the patch grid is.

Images are processed one at a time: a batched matmul may round differently from a
single-image one, and a greedy selection can flip on such a difference, which would make
a request's kept set depend on what it was batched with.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol

import torch
from torch import Tensor

from vllm_vtprune import registry
from vllm_vtprune import spec as spec_mod


@dataclasses.dataclass
class Probe:
    """Attention of one encoder layer, recomputed from its own projections (prefix
    tokens such as CLS first, then the patches)."""

    cls_attn: Tensor | None  # [H, P+N]: softmax row of the CLS query; None without CLS
    keys: Tensor  # [H, P+N, head_dim]
    attn: Tensor | None = None  # [P+N, P+N] softmax attention averaged over heads, when asked for
    values: Tensor | None = None  # [H, P+N, head_dim] when asked for
    context: Tensor | None = None  # [H, P+N, head_dim] softmax(q k^T) v, when asked for
    #: [N] the attention each token receives, averaged over heads and queries: what a
    #: tower without CLS gives in its place (Qwen2-VL)
    received: Tensor | None = None


class VisionTower(Protocol):
    num_layers: int
    prefix: int  # tokens before the patches in the hidden states (1 for CLS, else 0)
    grid: tuple[int, int]  # patch rows and columns, raster order

    def embed(self, pixel_values: Tensor) -> Tensor:
        """[1, 3, H, W] float32 pixels (cast to the tower's dtype here) -> [1, P+N, C]
        after any pre-layernorm."""

    def layer(self, i: int, hidden: Tensor) -> Tensor:
        """Encoder layer ``i`` on [1, M, C]."""

    def probe(self, i: int, hidden: Tensor, full: bool = False) -> Probe:
        """Attention that layer ``i`` computes on its input ``hidden`` [1, M, C]."""

    def agree(self, flag: bool) -> bool:
        """The same ``flag`` on every tensor-parallel rank (rank 0's), for a branch that
        decides whether a rank runs a collective; ``flag`` itself in one process."""

    def layer_probed(self, i: int, hidden: Tensor) -> tuple[Tensor, Tensor, Probe]:
        """Layer ``i`` computed once with its attention exposed: the residual stream after
        its attention and after its FFN branch, and its full probe (``attn``, ``values``)."""

    def keep(self, origins: Tensor) -> None:
        """A method inside the encoder kept :meth:`embed`'s patches ``origins``
        (ascending) for the next layers: a tower whose layers depend on where their
        tokens stand (Qwen-VL's rotary positions and windows) follows them."""


Projector = Callable[[Tensor], Tensor]


@dataclasses.dataclass
class PrunedImage:
    """What the LLM receives for one image, and where each token came from."""

    tokens: Tensor  # [K, D] in the order the LLM receives them
    origins: Tensor  # [K] patch index each token stands at (a merged token: its representative)
    kept: Tensor | None  # [K] patch indices when the tokens are a plain subset, else None
    positions: Tensor | None = None  # [K, 2] (row, col) of each origin in the patch grid
    prune_seconds: float = 0.0  # in the method's selection (with any tower layers it runs)
    #: the patches a budget chooses among (its ratio's base; the plans inside the LLM
    #: read it), 0 where not set
    num_patches: int = 0

    @classmethod
    def subset(cls, tokens: Tensor, kept: Tensor) -> "PrunedImage":
        return cls(tokens, kept, kept)

    @classmethod
    def merged(cls, tokens: Tensor, origins: Tensor) -> "PrunedImage":
        return cls(tokens, origins, None)


@dataclasses.dataclass
class ImageContext:
    """Per-image state a method's entry point reads (signatures never change).

    Encoder-output and projector-output methods get ``hidden`` (the feature layer's
    output, prefix tokens first) and the ``probe`` of that layer, recomputed only when a
    method reads it (random and divprune never do); methods inside the encoder get
    ``hidden = None`` and run the ``tower`` themselves.
    """

    tower: VisionTower
    project: Projector
    pixel_values: Tensor
    spec: spec_mod.PruneSpec
    text: Tensor | None  # [T, D] the prompt's nouns in the LLM's input space, or None
    num_patches: int
    budget: int  # tokens to keep (< num_patches)
    hidden: Tensor | None = None  # [P+N, C]
    last_input: Tensor | None = None  # [1, P+N, C] what the feature layer received
    _probe: Probe | None = None
    #: [N] bool: the patches the budget may keep (a LLaVA-NeXT tile's unpadded ones);
    #: None: all (methods inside the encoder read it)
    candidates: Tensor | None = None

    @property
    def probe(self) -> Probe:
        """The feature layer's attention, from its own projections of ``last_input``."""
        if self._probe is None:
            self._probe = self.tower.probe(self.tower.num_layers - 1, self.last_input)
        return self._probe

    @property
    def patches(self) -> Tensor:
        return self.hidden[self.tower.prefix:]

    @property
    def patch_importance(self) -> Tensor:
        """[N] attention the CLS query pays each patch, summed over heads; on a tower
        without CLS, the attention each token receives (``Probe.received``), which
        Polymorphic's paper uses on Qwen2-VL (Sec. 4.1)."""
        probe = self.probe
        if probe.cls_attn is None and probe.received is not None:
            return probe.received.float()
        if probe.cls_attn is None:
            raise ValueError(f"vtprune method {self.spec.method!r} needs CLS attention, "
                             "which this model's vision tower does not have")
        return probe.cls_attn.float().sum(0)[self.tower.prefix:]

    def option(self, name: str):
        return self.spec.value(name)


def is_text_conditioned(spec: spec_mod.PruneSpec | None) -> bool:
    return spec is not None and spec.text_conditioned


def kept_tokens(spec: spec_mod.PruneSpec | None, num_tokens: int,
                prunable: int | None = None) -> int:
    """Placeholder count of one image of ``num_tokens`` tokens, ``prunable`` of which a
    method chooses among (all by default; LLaVA-NeXT's newlines are not): the budget;
    every token without pruning or when the budget covers the prunable ones; for a
    method inside the LLM, what its encoder-side stage keeps (every token without one)."""
    if spec is None:
        return num_tokens
    prunable = num_tokens if prunable is None else prunable
    if acts_in_llm(spec):
        stage = registry.get(spec.method).encoder_budget
        keep = prunable if stage is None else stage(spec, prunable)
    else:
        keep = spec.tokens_for(prunable)
    return num_tokens if keep >= prunable else keep


def check_servable(spec: spec_mod.PruneSpec | None, family=None, server: bool = False) -> None:
    """Refuse a spec this version cannot serve (on ``family``'s models, when given; as
    the server's spec when ``server``, else per request)."""
    if spec is not None:
        registry.check_served(spec.method, family.provides if family else None,
                              f"{family.name} models" if family else "this model",
                              dict(spec.options), server)


def check_fits_decoder(spec: spec_mod.PruneSpec, num_layers: int, hidden_size: int,
                       full_tokens: int) -> None:
    """Refuse an in-LLM spec that cannot run on this decoder: a decision layer beyond
    its depth, a checkpoint made for another model."""
    method = registry.get(spec.method)
    if method.check_model is not None:
        method.check_model(spec, num_layers, hidden_size)
    method.llm_plan(spec, [(0, kept_tokens(spec, full_tokens))], num_layers, full_tokens)


def acts_in_llm(spec: spec_mod.PruneSpec | None) -> bool:
    return spec is not None and registry.get(spec.method).where is registry.Where.INSIDE_LLM


def run_layers(tower: VisionTower, hidden: Tensor, start: int, stop: int) -> Tensor:
    for i in range(start, stop):
        hidden = tower.layer(i, hidden)
    return hidden


def run_to_feature_layer(tower: VisionTower, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    """Feature-layer output [P+N, C], and that layer's input [1, P+N, C]."""
    last = tower.num_layers - 1
    h = run_layers(tower, tower.embed(pixel_values), 0, last)
    return tower.layer(last, h)[0], h


def run_with_last_probe(tower: VisionTower, pixel_values: Tensor) -> tuple[Tensor, Probe]:
    """Feature-layer output [P+N, C] and the probe of that last layer."""
    hidden, last_input = run_to_feature_layer(tower, pixel_values)
    return hidden, tower.probe(tower.num_layers - 1, last_input)


def grid_positions(origins: Tensor, grid: tuple[int, int]) -> Tensor:
    """(row, col) of raster patch indices in a ``grid`` of (rows, cols)."""
    cols = grid[1]
    origins = origins.to(torch.int64).cpu()
    return torch.stack([origins // cols, origins % cols], dim=1)


def prune_image(tower: VisionTower, project: Projector, pixel_values: Tensor,
                spec: spec_mod.PruneSpec | None, text: Tensor | None = None) -> PrunedImage:
    """Visual tokens of one image ([1, 3, H, W]) as the LLM receives them: [K, D]."""
    image = _prune(tower, project, pixel_values, spec, text)
    image.positions = grid_positions(image.origins, tower.grid)
    image.num_patches = tower.grid[0] * tower.grid[1]
    return image


def _prune(tower, project, pixel_values, spec, text) -> PrunedImage:
    check_servable(spec, server=True)
    num_patches = tower.grid[0] * tower.grid[1]
    k = kept_tokens(spec, num_patches)
    if k >= num_patches:
        return unpruned(tower, project, run_layers(tower, tower.embed(pixel_values), 0,
                                                   tower.num_layers)[0])
    method = registry.get(spec.method)
    if method.where is registry.Where.INSIDE_ENCODER:
        tower = _layered(tower)
    ctx = ImageContext(tower, project, pixel_values, spec, text, num_patches, k)
    if method.where is not registry.Where.INSIDE_ENCODER:
        ctx.hidden, ctx.last_input = run_to_feature_layer(tower, pixel_values)
    started = time.perf_counter()
    image = method.prune(ctx)
    image.prune_seconds = time.perf_counter() - started
    return image


def _layered(tower: VisionTower) -> VisionTower:
    """The tower a method inside the encoder runs: one encoder layer per ``layer`` call
    (a tower that runs the whole encoder as one, Qwen-VL's, gives its per-block form)."""
    layered = getattr(tower, "layered", None)
    return tower if layered is None else layered()


@dataclasses.dataclass
class TiledContext(ImageContext):
    """An image encoded as several tiles (LLaVA-NeXT), seen by a method as one tower
    output: ``hidden`` is the base tile's prefix then every tile's patches in the packed
    order of ``layout``; the probe is each patch's own tile's attention, built on first
    read from the tiles' feature-layer inputs."""

    layout: object = None  # vllm_vtprune.tiles.Layout
    tile_inputs: list | None = None  # per tile: [1, P+S, C] the feature layer's input

    @property
    def probe(self) -> Probe:
        if self._probe is None:
            last = self.tower.num_layers - 1
            self._probe = packed_probe([self.tower.probe(last, x) for x in self.tile_inputs],
                                       self.layout, self.tower.prefix)
        return self._probe


def packed_rows(per_tile: Tensor, layout, prefix: int) -> Tensor:
    """[T, P+S, ...] per-tile token rows -> [P+N, ...]: the base tile's prefix rows,
    then every patch in the packed order of ``layout``."""
    return torch.cat([per_tile[0, :prefix], per_tile[:, prefix:][layout.tile, layout.patch]])


def packed_probe(probes: list[Probe], layout, prefix: int) -> Probe:
    """One probe over the packed tokens from the tiles' own ([H, P+S] rows, keys)."""
    cls = None
    if probes[0].cls_attn is not None:
        cls = packed_rows(torch.stack([p.cls_attn.T for p in probes]), layout, prefix).T
    keys = packed_rows(torch.stack([p.keys.transpose(0, 1) for p in probes]), layout, prefix)
    return Probe(cls_attn=cls, keys=keys.transpose(0, 1))


def prune_tiled(tower: VisionTower, project: Projector, tiles: Tensor, layout,
                spec: spec_mod.PruneSpec | None, text: Tensor | None,
                newline: Tensor) -> PrunedImage:
    """Visual tokens of one image encoded as tiles ([T, 3, H, W]; base first) whose
    patches ``layout`` packs: [K, D] kept in packed order, or every token with a
    ``newline`` [D] after each row of the unpadded grid when nothing is pruned."""
    image = _prune_tiled(tower, project, tiles, layout, spec, text, newline)
    image.num_patches = layout.num_patches
    return image


def _prune_tiled(tower: VisionTower, project: Projector, tiles: Tensor, layout,
                 spec: spec_mod.PruneSpec | None, text: Tensor | None,
                 newline: Tensor) -> PrunedImage:
    check_servable(spec, server=True)
    k = kept_tokens(spec, layout.num_tokens, layout.num_patches)
    if k < layout.num_tokens and registry.get(spec.method).where is registry.Where.INSIDE_ENCODER:
        return _prune_tiles_in_encoder(tower, project, tiles, layout, spec, text, k)
    outputs, inputs = zip(*(run_to_feature_layer(tower, tiles[t:t + 1])
                            for t in range(layout.num_tiles)))
    per_tile = torch.stack(outputs)  # [T, P+S, C], each tile its own pass
    if k == layout.num_tokens:
        from vllm_vtprune.tiles import pack

        tokens = pack(project(per_tile[:, tower.prefix:]), layout, newline)
        # -1: a newline
        origins = torch.full((layout.num_tokens,), -1, dtype=torch.int64, device="cpu")
        origins[layout.rows] = torch.arange(layout.num_patches, device="cpu")
        return PrunedImage.merged(tokens, origins)
    ctx = TiledContext(tower, project, tiles, spec, text, layout.num_patches, k,
                       hidden=packed_rows(per_tile, layout, tower.prefix),
                       layout=layout, tile_inputs=list(inputs))
    started = time.perf_counter()
    image = registry.get(spec.method).prune(ctx)
    image.prune_seconds = time.perf_counter() - started
    return image


def tile_budgets(layout, budget: int) -> list[int]:
    """Each tile's share of an image's budget, by its patches in the layout (largest
    remainders, ties to the earlier tile); they sum to ``budget``."""
    counts = torch.bincount(layout.tile.cpu(), minlength=layout.num_tiles).tolist()
    exact = [budget * n / layout.num_patches for n in counts]
    shares = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda t: (shares[t] - exact[t], t))
    for t in order[:budget - sum(shares)]:
        shares[t] += 1
    return shares


def _prune_tiles_in_encoder(tower, project, tiles, layout, spec, text, k) -> PrunedImage:
    """A method inside the encoder on a tiled image: each tile's own pass prunes it to
    its share of the budget (:func:`tile_budgets`; DCP-Prune's LLaVA-NeXT budgets are
    per-tile ones times the tiles, e.g. 80 = 5 x 16), its candidates being the patches
    the layout keeps; the kept tokens then stand in the packed order."""
    method = registry.get(spec.method)
    side = tower.grid[0] * tower.grid[1]
    packed_at = torch.full((layout.num_tiles * side,), -1, dtype=torch.int64, device="cpu")
    packed_at[layout.tile.cpu() * side + layout.patch.cpu()] = torch.arange(
        layout.num_patches, device="cpu")
    tokens, origins, started = [], [], time.perf_counter()
    for t, share in enumerate(tile_budgets(layout, k)):
        if share == 0:
            continue
        candidates = packed_at[t * side:(t + 1) * side] >= 0
        ctx = ImageContext(tower, project, tiles[t:t + 1], spec, text, side, share,
                           candidates=candidates.to(tiles.device))
        image = method.prune(ctx)
        tokens.append(image.tokens)
        origins.append(packed_at[t * side + image.origins.cpu()])
    origins = torch.cat(origins)
    order = torch.argsort(origins)
    image = PrunedImage.merged(torch.cat(tokens)[order.to(tokens[0].device)], origins[order])
    image.prune_seconds = time.perf_counter() - started
    return image


def unpruned(tower: VisionTower, project: Projector, hidden: Tensor) -> PrunedImage:
    """Every patch of the feature-layer output ``hidden`` [P+N, C], projected."""
    patches = hidden[tower.prefix:]
    kept = torch.arange(patches.shape[0], device=patches.device)
    return PrunedImage.subset(project(patches), kept)


def noun_ids(tokenizer, question_ids: list[int], exclude: set[int],
             limit: int = 32) -> list[int]:
    """LLM-vocabulary ids of the question's nouns (ResPrune Eq. 13's text tokens).

    ``question_ids`` is the last user turn (the family finds it); it is decoded without
    special tokens and stripped of answer-format instructions; every sub-word id of
    every noun is kept (a multi-token noun contributes all of its pieces), first
    ``limit`` ids.
    """
    from vllm_vtprune import text as text_mod

    question = tokenizer.decode(question_ids, skip_special_tokens=True)
    nouns = text_mod.extract_nouns(text_mod.clean_prompt(question))
    if not nouns:
        return []
    ids = tokenizer.encode(" ".join(nouns), add_special_tokens=False)
    return [i for i in ids if i not in exclude][:limit]


def trace(spec: spec_mod.PruneSpec | None, text_ids: list[int], image: PrunedImage,
          rank: int = 0) -> None:
    """Append the kept set to ``$VTPRUNE_TRACE`` (JSON lines) when that variable is set.

    Lets tests and operators see which tokens a served request kept, and whether the
    encoder cache was hit (a hit computes nothing, so writes nothing). Under tensor
    parallelism every rank writes its own decision, with its ``rank``; ``pid`` tells
    data-parallel engines apart.
    """
    import json
    import os

    path = os.environ.get("VTPRUNE_TRACE")
    if not path:
        return
    kept = image.kept.tolist() if image.kept is not None else None
    with open(path, "a") as f:
        f.write(json.dumps({"spec": str(spec) if spec else "none", "rank": rank,
                            "pid": os.getpid(),
                            "text_ids": text_ids,
                            "num_tokens": int(image.tokens.shape[0]), "kept": kept,
                            "origins": image.origins.tolist()}) + "\n")
