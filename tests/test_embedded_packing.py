"""Packed training sequences: every turn must see exactly what a single-question prompt
shows the model, so the logits of its answer equal those of the evaluation path."""
import random

import pytest
import torch

from vllm_vtprune.data import shapes_vqa as sv
from vllm_vtprune.embedded.build import build_config, build_tokenizer
from vllm_vtprune.embedded.conversation import IGNORE, collate, encode_prompt
from vllm_vtprune.embedded.evaluate import next_token_logits


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(build_config()).eval(), build_tokenizer()


def packed_answer_logits(model, tok, qas, feats):
    """Logits predicting each turn's first answer token in one packed sequence."""
    from vllm_vtprune.embedded.build import IMAGE_TOKEN_ID

    ids, mask, positions, labels = collate(tok, [qas], [feats.shape[0]], random.Random(3))
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == IMAGE_TOKEN_ID] = feats
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=positions).last_hidden_state
    logits = model.lm_head(hidden)[0]
    # A turn's first answer token is a label whose previous token carries none.
    lab = labels[0]
    starts = [i for i in range(1, len(lab)) if lab[i] != IGNORE and lab[i - 1] == IGNORE]
    return {tok.decode([int(lab[i])]).strip(): logits[i - 1] for i in starts}, ids, starts


@torch.no_grad()
def test_each_packed_turn_equals_its_single_question_prompt(model_and_tokenizer):
    model, tok = model_and_tokenizer
    sample = sv.make_sample(sv.TRAIN_SEED, 5, questions_per_type=1)
    qas = [qa for qa in sample.qas if qa.qtype != "position"][:3]
    # Distinct answers let the turns be matched back after collate's shuffle.
    assert len({qa.answer for qa in qas}) == len(qas)
    feats = torch.randn(12, model.config.text_config.hidden_size)
    packed, ids, starts = packed_answer_logits(model, tok, qas, feats)
    assert len(starts) == len(qas)
    for qa in qas:
        # The hint appears in 30 % of training turns; compare against the matching prompt.
        turn_start = starts[[tok.decode([int(ids[0, s])]).strip() for s in starts].index(qa.answer)]
        hint = "single" in tok.decode(ids[0, :turn_start].tolist()).split("ASSISTANT")[-1]
        alone = next_token_logits(model, tok, [qa.question], [feats], hint=hint)[0]
        torch.testing.assert_close(packed[qa.answer], alone, atol=1e-4, rtol=1e-4)


def test_single_prompt_tokens_are_the_packed_prefix_and_turn(model_and_tokenizer):
    _, tok = model_and_tokenizer
    qa = sv.QA("exist", "is there a red circle ?", "yes")
    ids, _, positions, labels = collate(tok, [[qa]], [5], random.Random(0))
    n = len(encode_prompt(tok, qa.question, hint=False, num_image_tokens=5))
    n_hint = len(encode_prompt(tok, qa.question, hint=True, num_image_tokens=5))
    prompt_len = next(i for i, v in enumerate(labels[0].tolist()) if v != IGNORE)
    assert prompt_len in (n, n_hint)
    assert ids[0, :prompt_len].tolist() == encode_prompt(
        tok, qa.question, hint=prompt_len == n_hint, num_image_tokens=5)
    assert positions[0, :prompt_len].tolist() == list(range(prompt_len))
