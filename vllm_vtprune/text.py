"""Prompt text helpers for text-guided pruning (ResPrune Eq. 13-16, DCP-Prune TATCS).

* :func:`clean_prompt` strips what is about the answer format, not the image
  ("Answer the question using a single word or phrase.", "Please answer yes or no.",
  multiple-choice letter instructions, the ``<image>`` placeholder), so that relevance
  scores are computed against what the user asks to find.
* :func:`extract_nouns` returns the content words a pruner should search the image for.
  With spaCy and its English model (``en_core_web_sm``) installed, it keeps nouns and
  proper nouns; otherwise it uses a fallback that drops function words, question words,
  auxiliaries and a short list of frequent verbs, and keeps the rest.

Colour (and other visual-attribute) words such as "red" are kept on both paths even
though they are adjectives: in questions like "is there a red circle ?" the colour is
exactly what distinguishes the relevant image region, and ResPrune's relevance
``max_t cos(v_i, t)`` benefits from a token that matches it.
"""

from __future__ import annotations

import functools
import re

__all__ = ["clean_prompt", "extract_nouns", "COLOR_WORDS", "spacy_available"]

_ANSWER_FORMAT_PATTERNS = [
    r"answer the question using a single word or phrase\.?",
    r"answer (?:the question )?(?:using|with) a single word(?: or (?:a )?(?:short )?phrase)?\.?",
    r"answer with the option'?s letter from the given choices directly\.?",
    r"answer with the letter of the (?:correct )?option\.?",
    r"(?:please )?answer (?:with )?(?:yes or no|\"?yes\"? or \"?no\"?)\.?",
    r"(?:please )?(?:reply|respond) with (?:yes or no|a single word)\.?",
    r"answer briefly\.?",
    r"<image>",
]
_ANSWER_FORMAT_RE = re.compile("|".join(f"(?:{p})" for p in _ANSWER_FORMAT_PATTERNS), re.IGNORECASE)

COLOR_WORDS = frozenset(
    "red green blue yellow orange purple violet pink brown black white gray grey "
    "cyan magenta gold silver beige maroon navy teal turquoise".split()
)

# Fallback filter: everything here says how something is asked, not what to look at.
_FUNCTION_WORDS = frozenset(
    """
    a an the this that these those there here it its it's they them their theirs
    he him his she her hers we us our ours you your yours i me my mine one ones
    is are was were be been being am do does did doing done have has had having
    can could will would shall should may might must
    what which who whom whose where when why how whether
    and or but nor not no yes if then than so as of in on at by for with from to
    into onto over under above below between behind near about against among
    through during before after up down out off any some all each every both either
    neither other another such same more most less least many much few several
    very too also just only even still yet again
    please answer question questions image picture photo shown show shows see seen
    look looks visible appear appears kind type number many
    single word phrase option options letter choice choices given directly following
    describe tell give
    """.split()
)

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z\-']*")


def clean_prompt(text: str) -> str:
    """The prompt without answer-format instructions and image placeholders.

    Whitespace is collapsed; the question itself is kept verbatim otherwise.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    stripped = _ANSWER_FORMAT_RE.sub(" ", text)
    return re.sub(r"\s+", " ", stripped).strip()


@functools.lru_cache(maxsize=1)
def _spacy_nlp():
    """The spaCy English pipeline, or None when spaCy or its model is not installed."""
    try:
        import spacy

        return spacy.load("en_core_web_sm", disable=["ner", "lemmatizer"])
    except Exception:  # ImportError, or OSError when the model package is missing
        return None


def spacy_available() -> bool:
    """True when :func:`extract_nouns` uses spaCy rather than the fallback filter."""
    return _spacy_nlp() is not None


def _dedupe(words: list[str]) -> list[str]:
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]


def _nouns_spacy(nlp, text: str) -> list[str]:
    doc = nlp(text)
    words = [
        tok.text.lower()
        for tok in doc
        if tok.pos_ in ("NOUN", "PROPN") or tok.text.lower() in COLOR_WORDS
    ]
    return _dedupe(words)


def _nouns_fallback(text: str) -> list[str]:
    words = [w.lower().strip("'-") for w in _WORD_RE.findall(text)]
    keep = [w for w in words if len(w) > 1 and w not in _FUNCTION_WORDS]
    return _dedupe(keep)


def extract_nouns(text: str, use_spacy: bool | None = None) -> list[str]:
    """Lower-cased content words of the cleaned prompt, in order of first appearance.

    ``use_spacy``: None picks spaCy when available; False forces the fallback filter;
    True requires spaCy (RuntimeError when it or ``en_core_web_sm`` is missing).
    """
    cleaned = clean_prompt(text)
    nlp = _spacy_nlp() if use_spacy is not False else None
    if use_spacy and nlp is None:
        raise RuntimeError("spaCy with the en_core_web_sm model is not installed")
    if nlp is not None:
        return _nouns_spacy(nlp, cleaned)
    return _nouns_fallback(cleaned)
