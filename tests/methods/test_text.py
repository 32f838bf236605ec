import pytest

from vllm_vtprune import text
from vllm_vtprune.text import clean_prompt, extract_nouns


def test_clean_prompt_removes_answer_format():
    p = "<image>\nIs there a red circle?\nAnswer the question using a single word or phrase."
    assert clean_prompt(p) == "Is there a red circle?"
    assert clean_prompt("Is it blue? Please answer yes or no.") == "Is it blue?"
    mc = "Which shape?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
    assert "letter" not in clean_prompt(mc) and "cat" in clean_prompt(mc)
    assert clean_prompt("what color is the triangle ?") == "what color is the triangle ?"


@pytest.mark.parametrize("use_spacy", [False, None])
def test_required_examples(use_spacy):
    if use_spacy is None and not text.spacy_available():
        pytest.skip("spaCy English model not installed")
    assert "circle" in extract_nouns("is there a red circle ?", use_spacy=use_spacy)
    assert "red" in extract_nouns("is there a red circle ?", use_spacy=use_spacy)
    assert "triangle" in extract_nouns("what color is the triangle ?", use_spacy=use_spacy)


def test_fallback_drops_function_words_and_format():
    words = extract_nouns(
        "How many blue squares are there in the image? Answer the question using a single word or phrase.",
        use_spacy=False,
    )
    assert words == ["blue", "squares"]
    assert extract_nouns("", use_spacy=False) == []
    assert extract_nouns("is it ?", use_spacy=False) == []


def test_fallback_dedupes_and_lowercases():
    assert extract_nouns("The Circle and the circle", use_spacy=False) == ["circle"]


def test_spacy_path_when_installed():
    pytest.importorskip("spacy")
    if not text.spacy_available():
        pytest.skip("en_core_web_sm not installed")
    words = extract_nouns("is there a red circle next to the green square ?", use_spacy=True)
    assert {"circle", "square", "red", "green"} <= set(words)
    assert "there" not in words and "is" not in words


def test_use_spacy_true_without_model_raises():
    if text.spacy_available():
        pytest.skip("spaCy model installed")
    with pytest.raises(RuntimeError):
        extract_nouns("a circle", use_spacy=True)


def test_type_errors():
    with pytest.raises(TypeError):
        clean_prompt(None)
