"""Packed training sequences: every turn must see exactly what a single-question prompt
shows the model, so the logits of its answer equal those of the evaluation path."""
import random

import pytest
import torch

from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded.build import IMAGE_TOKEN_ID, build_config, build_tokenizer
from vllm_vtprune.embedded.conversation import (IGNORE, IMAGE_PREFIX, collate, encode_packed,
                                                encode_prompt, packed_attention_mask,
                                                question_text)
from vllm_vtprune.embedded.evaluate import next_token_logits


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(build_config()).eval(), build_tokenizer()


@pytest.fixture(scope="module")
def qas():
    sample = sv.make_sample(sv.TRAIN_SEED, 5, questions_per_type=1)
    return [qa for qa in sample.qas if qa.qtype != "position"][:3]


def logits_of(model, ids, mask, positions, feats):
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == IMAGE_TOKEN_ID] = torch.cat(feats)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=positions).last_hidden_state
    return model.lm_head(hidden)


def answer_starts(labels: list[int]) -> list[int]:
    """Indices of each turn's first answer token: a label after a position without one."""
    return [i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE]


@torch.no_grad()
def test_each_packed_turn_equals_its_single_question_prompt(model_and_tokenizer, qas):
    model, tok = model_and_tokenizer
    hints = [False, True, False]
    feats = torch.randn(12, model.config.text_config.hidden_size)
    ids, labels, positions, segments = encode_packed(tok, qas, hints, num_image_tokens=12)
    logits = logits_of(model, torch.tensor([ids]), packed_attention_mask(torch.tensor([segments])),
                       torch.tensor([positions]), [feats])[0]
    starts = answer_starts(labels)
    assert len(starts) == len(qas)
    for qa, hint, start in zip(qas, hints, starts):
        alone = next_token_logits(model, tok, [qa.question], [feats], hint=hint)[0]
        torch.testing.assert_close(logits[start - 1], alone, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_collate_padding_leaves_each_turn_unchanged(model_and_tokenizer, qas):
    """A short conversation padded beside a long one still answers as if asked alone."""
    model, tok = model_and_tokenizer
    feats = [torch.randn(n, model.config.text_config.hidden_size) for n in (20, 7)]
    ids, mask, positions, labels = collate(tok, [qas, qas[:1]], [20, 7], random.Random(3))
    logits = logits_of(model, ids, mask, positions, feats)
    prefix = len(tok(IMAGE_PREFIX, add_special_tokens=False).input_ids)  # BOS in, <image> out
    for row, n in enumerate((20, 7)):
        for start in answer_starts(labels[row].tolist()):
            # Every turn is positioned right after the prefix, so its position says where it began.
            turn_start = start - (int(positions[row, start]) - (prefix + n))
            prompt = ids[row, turn_start:start].tolist()
            qa, hint = next((q, h) for q in qas for h in (False, True) if prompt == tok(
                question_text(q.question, h), add_special_tokens=False).input_ids)
            alone = next_token_logits(model, tok, [qa.question], [feats[row]], hint=hint)[0]
            torch.testing.assert_close(logits[row, start - 1], alone, atol=1e-4, rtol=1e-4)


def test_single_prompt_tokens_are_the_packed_prefix_and_turn(model_and_tokenizer):
    _, tok = model_and_tokenizer
    qa = sv.QA("exist", "is there a red circle ?", "yes")
    for hint in (False, True):
        ids, labels, positions, _ = encode_packed(tok, [qa], [hint], num_image_tokens=5)
        prompt_len = answer_starts(labels)[0]
        assert ids[:prompt_len] == encode_prompt(tok, qa.question, hint, num_image_tokens=5)
        assert positions[:prompt_len] == list(range(prompt_len))
