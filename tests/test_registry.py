"""The method registry and the family adapters: what every other part derives from."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vllm_vtprune import cli, families, pipeline, registry
from vllm_vtprune import spec as spec_mod
from vllm_vtprune.embedded import SMALL_MODEL, model_path
from vllm_vtprune.families import llava


def _collected(path: str) -> list[str]:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", path],
                         cwd=root, capture_output=True, text=True, timeout=120).stdout
    return [line for line in out.splitlines() if "[" in line]


def test_every_served_method_is_in_a_vllm_parity_test():
    """As pytest collects them: each served method at two budgets, encoder-side ones in
    test_offline, those inside the LLM in test_in_llm's mixed-batch parity test."""
    ids = [line.split("[", 1)[1].rstrip("]") for line in _collected("tests/serving/test_offline.py")
           if "::test_greedy_outputs_match_transformers_reference[" in line]
    for method in set(registry.served()) - set(registry.in_llm()):
        assert len([i for i in ids if i.startswith(method + ":")]) == 2, (method, ids)
    assert {"resprune", "divprune", "visionzip", "dcp", "random"} <= set(registry.served())
    lines = _collected("tests/serving/test_in_llm.py")
    for method in registry.in_llm():
        assert len([l for l in lines if "::test_mixed_batch_equals_reference_alone_and_batched["
                    in l and f"[{method}:" in l]) == 2, (method, lines)
    assert {"fastv", "polymorphic", "rcp"} <= set(registry.in_llm())


def test_methods_inside_the_llm_are_refused_per_request_on_servers_without_them(rcp_checkpoint):
    for name in registry.in_llm():
        spec = spec_mod.parse(f"{name}:64" + (f",ckpt={rcp_checkpoint}" if name == "rcp" else ""))
        with pytest.raises(ValueError) as err:
            pipeline.check_servable(spec)  # per request
        assert "inside the language model" in str(err.value)
        assert f"--vtprune {name}:K" in str(err.value)
        assert all(m in str(err.value) for m in registry.served() if m not in registry.in_llm())
        pipeline.check_servable(spec, llava.FAMILY, server=True)


def test_vtprune_methods_lists_every_method(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in registry.methods().values():
        assert m.name in out and m.where.value in out


def test_unsupported_family_fails_naming_the_supported():
    from types import SimpleNamespace

    cfg = SimpleNamespace(model_type="idefics3", vision_config=SimpleNamespace(model_type="x"))
    with pytest.raises(ValueError, match="'idefics3'.*supported: LLaVA-1.5") as err:
        families.for_config(cfg)
    for name in ("LLaVA-NeXT", "Qwen2-VL", "Qwen2.5-VL"):
        assert name in str(err.value)
    # a LLaVA config with a tower no family adapts is not served either
    llava_siglip = SimpleNamespace(model_type="llava",
                                   vision_config=SimpleNamespace(model_type="siglip_vision_model"))
    with pytest.raises(ValueError, match="'siglip_vision_model'"):
        families.for_config(llava_siglip)


def test_unpruned_and_subset_results_carry_origins_and_grid_positions():
    origins = torch.tensor([0, 5, 24, 575])
    pos = pipeline.grid_positions(origins, (24, 24))
    assert pos.tolist() == [[0, 0], [0, 5], [1, 0], [23, 23]]
    # a non-square grid: rows and columns are the tower's, not sqrt(N)
    assert pipeline.grid_positions(torch.tensor([7]), (2, 5)).tolist() == [[1, 2]]


# ---------------------------------------------------------------- the question
def _case_keeping_tokenizer():
    """A word-level tokenizer that keeps case, with llava-hf's chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "<s> </s> <unk> <image> USER ASSISTANT : user is the a red circle ? what did " \
            "say about square".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = AutoTokenizer.from_pretrained(model_path(SMALL_MODEL)).chat_template
    return fast


def _question(tokenizer, prompt):
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    return tokenizer.decode(llava.question_ids(tokenizer, ids), skip_special_tokens=True)


def test_role_words_are_not_nouns_with_the_lower_casing_embedded_tokenizer():
    tok = AutoTokenizer.from_pretrained(model_path(SMALL_MODEL))
    assert tok("USER").input_ids[-1] == tok("user").input_ids[-1]  # it lower-cases
    prompt = "USER: <image>\nis there a red circle ? ASSISTANT:"
    words = _question(tok, prompt).split()
    assert "user" not in words and "assistant" not in words and words[-2:] == ["circle", "?"]
    ids = tok(prompt).input_ids
    nouns = tok.convert_ids_to_tokens(
        pipeline.noun_ids(tok, llava.question_ids(tok, ids), {tok.convert_tokens_to_ids("<image>")}))
    assert nouns == ["red", "circle"]


def test_last_user_turn_of_a_multi_turn_prompt():
    tok = AutoTokenizer.from_pretrained(model_path(SMALL_MODEL))
    prompt = ("USER: <image>\nwhat color is the square ? ASSISTANT: red</s>"
              "USER: is there a circle ? ASSISTANT:")
    assert "square" not in _question(tok, prompt) and "circle" in _question(tok, prompt)


def test_case_keeping_tokenizer_keeps_the_word_user_in_a_question():
    tok = _case_keeping_tokenizer()
    assert llava.role_markers(tok) == ("USER:", "ASSISTANT:")
    question = _question(tok, "USER: what did the user say about the red circle ? ASSISTANT:")
    assert question.split()[:3] == ["what", "did", "the"] and "user" in question.split()
    assert "USER" not in question and "ASSISTANT" not in question


def test_tokenizer_without_chat_template_uses_the_llava_format():
    tok = _case_keeping_tokenizer()
    tok.chat_template = None
    assert llava.role_markers(tok) == llava.DEFAULT_ROLES
    assert "circle" in _question(tok, "USER: is the red circle ? ASSISTANT:")


def test_a_method_needing_what_the_family_lacks_is_refused_naming_the_usable():
    from dataclasses import replace

    no_cls = replace(llava.FAMILY, name="CLS-free", provides=frozenset({"text", "keys"}))
    with pytest.raises(ValueError) as err:
        pipeline.check_servable(spec_mod.parse("visionzip:64"), no_cls)
    msg = str(err.value)
    assert "needs cls_attention" in msg and "CLS-free models" in msg
    assert "resprune" in msg and "random" in msg and "polymorphic" not in msg
    pipeline.check_servable(spec_mod.parse("resprune:64"), no_cls)  # seeds by norm
    with pytest.raises(ValueError, match="'resprune' needs cls_attention"):
        pipeline.check_servable(spec_mod.parse("resprune:64,seed=cls"), no_cls)
    for name in set(registry.served()) - set(registry.in_llm()):
        pipeline.check_servable(spec_mod.parse(f"{name}:8"), llava.FAMILY)


def test_system_preamble_is_not_part_of_the_user_marker():
    tok = _case_keeping_tokenizer()
    tok.chat_template = "A chat between a user and an assistant. " + tok.chat_template
    assert llava.role_markers(tok) == ("USER:", "ASSISTANT:")
    prompt = ("A chat between a user and an assistant. USER: what did the user say ? "
              "ASSISTANT: red</s>USER: is the red circle ? ASSISTANT:")
    assert _question(tok, prompt).split() == ["is", "the", "red", "circle", "?"]
