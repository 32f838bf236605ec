"""M-RoPE positions of pruned images (vllm_vtprune.models.mrope) against transformers'
own Qwen2-VL positions (``get_rope_index`` on the unpruned prompt), with the pruned
images' dropped columns removed: an independent reference for kept tokens at their
unpruned (t, h, w) and text after each image where it stands unpruned."""
from __future__ import annotations

import types

import pytest
import torch

from vllm_vtprune.models import mrope

IMG, START, END = 9, 7, 8


def _qwen():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    fake = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=2)))
    fake.get_vision_position_ids = types.MethodType(Qwen2VLModel.get_vision_position_ids, fake)
    fake.get_rope_index = types.MethodType(Qwen2VLModel.get_rope_index, fake)
    return fake


def _prompt(counts):
    return [1, 2, START] + [IMG] * counts[0] + [END, 3, 4, 5, START] + [IMG] * counts[1] + [END, 6]


# patch grids (t, h, w): a wide image and a tall one (the text after a tall image starts
# at its height, not its width)
GRIDS = [(1, 8, 12), (1, 14, 4)]


def _reference(kept):
    """transformers' positions of the unpruned prompt, pruned columns removed."""
    full_counts = [t * h * w // 4 for t, h, w in GRIDS]
    ids = torch.tensor([_prompt(full_counts)])
    positions, _ = _qwen().get_rope_index(ids, (ids == IMG).int(),
                                          image_grid_thw=torch.tensor(GRIDS))
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    rows = (ids[0] == IMG).nonzero().flatten().split(full_counts)
    for image_rows, k in zip(rows, kept):
        dropped = torch.ones(len(image_rows), dtype=torch.bool)
        dropped[k] = False
        keep[image_rows[dropped]] = False
    return positions[:, 0, keep]


def _merged(grid):
    t, h, w = grid
    return t, h // 2, w // 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_tokens_keep_their_unpruned_positions(seed):
    generator = torch.Generator().manual_seed(seed)
    full = [t * h * w // 4 for t, h, w in GRIDS]
    kept = [torch.sort(torch.randperm(n, generator=generator)[:k]).values
            for n, k in zip(full, (5, 3))]
    ids = _prompt([len(k) for k in kept])
    offsets = [3, 3 + len(kept[0]) + 5]
    positions, delta = mrope.input_positions(
        len(ids), [(o, len(k), _merged(g)) for o, k, g in zip(offsets, kept, GRIDS)])
    embeds = [torch.cat([torch.randn(len(k), 4), mrope.encode(k, _merged(g))], 1).bfloat16()
              for k, g in zip(kept, GRIDS)]
    stripped, out, new_delta = mrope.recompute(ids, embeds, positions, 0, IMG)
    expected = _reference(kept)
    assert torch.equal(out, expected)
    assert new_delta == delta == int(expected.max()) + 1 - len(ids)
    assert [s.shape[1] for s in stripped] == [4, 4]
    # the text was already where it belongs before the image rows were known
    text = torch.tensor(ids) != IMG
    assert torch.equal(positions[:, text], expected[:, text])


def test_chunked_prefill_and_repeated_calls_give_the_same_positions():
    kept = [torch.tensor([0, 5, 7, 20]), torch.tensor([1, 2, 13])]
    ids = _prompt([4, 3])
    offsets = [3, 3 + 4 + 5]
    positions, _ = mrope.input_positions(
        len(ids), [(o, len(k), _merged(g)) for o, k, g in zip(offsets, kept, GRIDS)])
    embeds = [torch.cat([torch.zeros(len(k), 2), mrope.encode(k, _merged(g))], 1)
              for k, g in zip(kept, GRIDS)]
    # a chunk ends inside the first image: rows 0-4 hold two of its tokens
    _, step1, _ = mrope.recompute(ids, [embeds[0][:2]], positions, 0, IMG)
    _, step2, _ = mrope.recompute(ids, [embeds[0][2:], embeds[1]], step1, 5, IMG)
    _, again, _ = mrope.recompute(ids, [embeds[1]], step2, 12, IMG)
    assert torch.equal(step2, _reference(kept))
    assert torch.equal(again, step2)


def test_renumbered_positions_are_not_the_unpruned_ones():
    """What the tests above would catch: positions counted after pruning."""
    kept = [torch.tensor([3, 10, 22]), torch.tensor([0, 12])]
    ids = _prompt([3, 2])
    renumbered = torch.arange(len(ids)).expand(3, -1)
    assert not torch.equal(renumbered, _reference(kept))


def test_channels_are_exact_in_bfloat16_for_large_grids():
    grid = (3, 300, 700)
    kept = torch.tensor([0, 299 * 700 + 1, 3 * 300 * 700 - 1])
    places = mrope.decode(mrope.encode(kept, grid).bfloat16())
    assert places.T.tolist() == [[0, 0, 0], [0, 299, 1], [2, 299, 699]]
