"""shapes-llava v2 is grown from v1 by function-preserving deepening (Net2DeeperNet)."""
from __future__ import annotations

import pytest
import torch

from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded import build
from vllm_vtprune.embedded.conversation import pixel_values
from vllm_vtprune.embedded.train import _net2deeper, deepen, pool_jobs


@pytest.fixture(scope="module")
def grown():
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    small = LlavaForConditionalGeneration(build.build_config()).eval()
    with torch.no_grad():  # random output projections, unlike a fresh init's small ones
        for p in small.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return small, deepen(small).eval()


def _logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def test_deepened_model_has_v2_shape(grown):
    _, deep = grown
    assert deep.config.vision_config.num_hidden_layers == build.V2_VISION_LAYERS == 24
    assert deep.config.text_config.num_hidden_layers == build.V2_TEXT_LAYERS == 16
    assert deep.config.text_config.vocab_size == len(build.vocabulary()) == 102


def test_deepened_model_computes_the_same_logits(grown):
    small, deep = grown
    tok = build.build_tokenizer(build.V1_VOCAB_SIZE)
    image, qa = next(iter(sv.iter_questions(sv.HELDOUT_SEED, 1, start=300)))
    text = "USER: " + "<image>" * 576 + "\n" + qa.question + " ASSISTANT:"
    ids = torch.tensor([tok(text).input_ids])
    a, b = _logits(small, ids, pixel_values([image])), _logits(deep, ids, pixel_values([image]))
    # the same sums in the same order: equal to fp32 rounding of a different kernel split
    assert (a - b[..., :a.shape[-1]]).abs().max() < 1e-4 * a.abs().max()
    assert (b[..., a.shape[-1]:] == 0).all()  # the new words' output rows start at zero


def test_new_layers_are_copies_with_zeroed_outputs():
    old = [torch.nn.Linear(2, 2) for _ in range(3)]
    new = [torch.nn.Linear(2, 2) for _ in range(7)]
    zeroed = []
    _net2deeper(old, new, used_old=2, used_new=6, zero_output=lambda m: zeroed.append(m))
    # old 0 at new 0 (copies 1, 2), old 1 at new 3 (copies 4, 5), old 2 copied to new 6
    assert [new.index(m) for m in zeroed] == [1, 2, 4, 5]
    for j, i in enumerate([0, 0, 0, 1, 1, 1, 2]):
        assert torch.equal(new[j].weight, old[i].weight)


def test_pool_spreads_hard_images_and_counts_each_split_from_the_offset():
    jobs = pool_jobs(10, 100, 0.3)
    assert sum(s == "hard" for s, _ in jobs) == 3
    assert [i for s, i in jobs if s == "hard"] == [100, 101, 102]
    assert [i for s, i in jobs if s == "standard"] == list(range(100, 107))
    assert pool_jobs(4, 0, 0.0) == [("standard", i) for i in range(4)]
