"""Answer matching for generation mode: SQuAD-style normalization and whole-word containment."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = ["contains_answer", "normalize_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower-case, strip accents, punctuation and articles, collapse whitespace (SQuAD-style normalization)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def contains_answer(output: str, answers: Sequence[str]) -> bool:
    """Whether the normalized ``output`` contains any normalized answer as whole words (empty answers never match)."""
    haystack = f" {normalize_answer(output)} "
    return any(f" {normalize_answer(a)} " in haystack for a in answers if normalize_answer(a))
