"""LLaVA-NeXT's packed layout against transformers' own packing (an independent
implementation: ``LlavaNextModel.pack_image_features``), and the tiled pipeline path
against transformers' image features."""
from __future__ import annotations

import pytest
import torch

from vllm_vtprune import pipeline
from vllm_vtprune import spec as spec_mod
from vllm_vtprune.families import llava_next
from vllm_vtprune.tiles import pack

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# (height, width): square, wide, tall, extreme ratios, odd sizes, smaller than a tile
SIZES = [(336, 336), (336, 504), (700, 336), (300, 700), (1000, 333), (123, 457),
         (90, 60), (1008, 1008)]


class _Packer:
    """Just enough of a LlavaNextModel for its ``pack_image_features``."""

    def __init__(self):
        from transformers import CLIPVisionConfig, LlavaNextConfig

        self.config = LlavaNextConfig(vision_config=CLIPVisionConfig(
            image_size=336, patch_size=14).to_dict(), image_grid_pinpoints=PINPOINTS)

    def pack(self, features, size, newline):
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        out, _ = LlavaNextModel.pack_image_features(self, [features], torch.tensor([size]),
                                                    "default", newline)
        return out[0]


@pytest.mark.parametrize("size", SIZES)
def test_layout_packs_as_transformers_does(size):
    lay = llava_next.layout(size, PINPOINTS, 336, 24)
    # every token carries its (tile, patch) so a wrong place cannot go unnoticed
    tiles = torch.stack(torch.meshgrid(torch.arange(lay.num_tiles, dtype=torch.float64),
                                       torch.arange(576, dtype=torch.float64),
                                       indexing="ij"), dim=-1)  # [T, 576, 2]
    newline = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    expected = _Packer().pack(tiles, size, newline)
    assert torch.equal(pack(tiles, lay, newline), expected)
    assert lay.num_tokens == expected.shape[0]
    assert lay.num_patches == int((expected[:, 0] >= 0).sum())
    assert torch.equal(pack(tiles, lay, None), expected[expected[:, 0] >= 0])


def test_kept_count_is_the_budget_over_patches_and_everything_at_or_above_them():
    lay = llava_next.layout((336, 504), PINPOINTS, 336, 24)
    n, full = lay.num_patches, lay.num_tokens
    assert full > n  # newlines
    keep = pipeline.kept_tokens
    assert keep(spec_mod.parse("resprune:64"), full, n) == 64
    assert keep(spec_mod.parse("resprune:0.25"), full, n) == round(0.25 * n)
    assert keep(spec_mod.parse(f"resprune:{n - 1}"), full, n) == n - 1
    assert keep(spec_mod.parse(f"resprune:{n}"), full, n) == full  # unpruned: newlines too
    assert keep(spec_mod.parse("resprune:1.0"), full, n) == full
    assert keep(None, full, n) == full


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from vllm_vtprune.embedded.build import build

    path = build("llava_next", tmp_path_factory.mktemp("next") / "model")
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("size", [(336, 336), (504, 336), (336, 700)])
def test_unpruned_tiles_give_transformers_image_features(next_model, size):
    """Tiles through the tower one at a time, packed by the layout: transformers'
    features (all tiles in one batch) up to batched-matmul rounding."""
    from vllm_vtprune.data import shapes_vqa as sv
    from vllm_vtprune.families.llava import HfClipTower

    model, processor = next_model
    image = sv.make_sample(2, 3).image.resize(size)
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output[0]
        lay = llava_next.layout_of(model.config, tuple(inputs["image_sizes"][0].tolist()))
        tower = HfClipTower(model.model.vision_tower, model.config.vision_config, -2)
        image_out = pipeline.prune_tiled(tower, model.model.multi_modal_projector,
                                         inputs["pixel_values"][0, :lay.num_tiles], lay, None,
                                         None, model.model.image_newline)
    torch.testing.assert_close(image_out.tokens, expected, rtol=1e-4, atol=1e-4)
    assert int((image_out.origins == -1).sum()) == lay.num_tokens - lay.num_patches


def test_packed_probe_reads_each_patch_from_its_own_tile():
    lay = llava_next.layout((336, 504), PINPOINTS, 336, 24)
    probes = [pipeline.Probe(cls_attn=torch.full((2, 577), float(t)),
                             keys=torch.arange(577.0).view(1, 577, 1).expand(2, 577, 3) + 1000 * t)
              for t in range(lay.num_tiles)]
    packed = pipeline.packed_probe(probes, lay, prefix=1)
    assert packed.cls_attn.shape == (2, 1 + lay.num_patches)
    assert torch.equal(packed.cls_attn[0, 1:], lay.tile.float())
    assert torch.equal(packed.keys[0, 1:, 0], 1000 * lay.tile.float() + 1 + lay.patch.float())
    assert packed.keys[0, 0, 0] == 0  # the base tile's CLS


@pytest.mark.parametrize("budget", [1, 7, 48, 100, 333])
@pytest.mark.parametrize("size", SIZES)
def test_tile_budgets_split_by_patches_and_sum_to_the_budget(size, budget):
    lay = llava_next.layout(size, PINPOINTS, 336, 24)
    budget = min(budget, lay.num_patches)
    shares = pipeline.tile_budgets(lay, budget)
    counts = torch.bincount(lay.tile, minlength=lay.num_tiles).tolist()
    assert sum(shares) == budget and len(shares) == lay.num_tiles
    assert all(abs(s - budget * n / lay.num_patches) < 1 for s, n in zip(shares, counts))
    assert all(s <= n for s, n in zip(shares, counts))


def _tiled_dcp(next_model, size, spec):
    from vllm_vtprune.data import shapes_vqa as sv
    from vllm_vtprune.families.llava import HfClipTower

    model, processor = next_model
    image = sv.make_sample(2, 5).image.resize(size)
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    lay = llava_next.layout_of(model.config, tuple(inputs["image_sizes"][0].tolist()))
    tower = HfClipTower(model.model.vision_tower, model.config.vision_config, -2)
    tiles = inputs["pixel_values"][0, :lay.num_tiles]
    with torch.no_grad():
        image_out = pipeline.prune_tiled(tower, model.model.multi_modal_projector, tiles, lay,
                                         spec_mod.parse(spec), None, model.model.image_newline)
    return image_out, lay, tower, tiles


@pytest.mark.parametrize("size", [(504, 336), (700, 300), (336, 336)])
def test_dcp_keeps_each_tiles_share_of_unpadded_patches_in_packed_order(next_model, size):
    image, lay, _, _ = _tiled_dcp(next_model, size, "dcp:48")
    origins = image.origins
    assert image.tokens.shape[0] == 48 and origins.tolist() == sorted(set(origins.tolist()))
    assert 0 <= int(origins.min()) and int(origins.max()) < lay.num_patches  # no padding
    kept_per_tile = torch.bincount(lay.tile[origins], minlength=lay.num_tiles).tolist()
    assert kept_per_tile == pipeline.tile_budgets(lay, 48)


def test_dcp_on_unpadded_tiles_is_dcp_on_each_tile_alone(next_model):
    """A 2:1 image fills its 1x2 grid exactly (no padding): each tile's kept tokens are
    those DCP keeps on that tile as a LLaVA-1.5 image of its share."""
    model, _ = next_model
    image, lay, tower, tiles = _tiled_dcp(next_model, (672, 336), "dcp:40")
    assert lay.num_patches == lay.num_tiles * 576  # nothing cut off
    shares = pipeline.tile_budgets(lay, 40)
    want_tokens, want_origins = [], []
    with torch.no_grad():
        for t, share in enumerate(shares):
            alone = pipeline.prune_image(tower, model.model.multi_modal_projector,
                                         tiles[t:t + 1], spec_mod.parse(f"dcp:{share}"))
            packed = {(int(a), int(b)): j for j, (a, b) in enumerate(zip(lay.tile, lay.patch))}
            want_origins += [packed[(t, int(p))] for p in alone.origins]
            want_tokens.append(alone.tokens)
    order = torch.argsort(torch.tensor(want_origins))
    assert image.origins.tolist() == sorted(want_origins)
    torch.testing.assert_close(image.tokens, torch.cat(want_tokens)[order], rtol=0, atol=0)
