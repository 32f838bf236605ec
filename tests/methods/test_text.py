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
    # use_spacy=None takes spaCy where its English model is installed, else the fallback.
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


class _Token:
    def __init__(self, word, pos):
        self.text, self.pos_ = word, pos


def test_spacy_path_keeps_nouns_and_colours_from_the_tagger():
    """The spaCy branch's filtering, on hand-tagged tokens (the tagger is spaCy's job)."""
    tagged = [("is", "AUX"), ("there", "PRON"), ("a", "DET"), ("red", "ADJ"),
              ("Circle", "NOUN"), ("next", "ADV"), ("to", "ADP"), ("Paris", "PROPN"),
              ("circle", "NOUN"), ("?", "PUNCT")]
    words = text._nouns_spacy(lambda _: [_Token(w, p) for w, p in tagged], "ignored")
    assert words == ["red", "circle", "paris"]


def test_spacy_path_end_to_end_or_clear_error():
    words = "is there a red circle next to the green square ?"
    if text.spacy_available():
        found = extract_nouns(words, use_spacy=True)
        assert {"circle", "square", "red", "green"} <= set(found)
        assert "there" not in found and "is" not in found
    else:
        with pytest.raises(RuntimeError, match="en_core_web_sm"):
            extract_nouns(words, use_spacy=True)


def test_type_errors():
    with pytest.raises(TypeError):
        clean_prompt(None)
