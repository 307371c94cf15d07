"""Answer matching for generation mode: SQuAD-style normalization and whole-word containment.

The two answers of a probe may contain each other ("York" and "New York"). :func:`match_answers` then matches the
longer answer first and does not count the words it covered for the shorter one: an output "New York" is a hit for
"New York" only, "York is nice" for "York" only, and "New York and York" for both. Aliases take part like the main
answers; an answer text shared by both groups hits both. Loading probes warns about such pairs
(:func:`answers_overlap`, used by :func:`ctx_callback.load_probes`).

Multiple-choice probes in generation mode: every option is one answer group (see :func:`match_answers`); when the
prompt lists the options as ``A. ...``, ``B. ...`` (``list_options``), an output that starts with an option's letter
(``"B"``, ``"B."``, ``"(B)"``, ``"B) the moon"``; see :func:`option_label`) names that option too.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # probes.py imports this module
    from .probes import Probe

__all__ = ["answer_hits", "answers_overlap", "contains_answer", "match_answers", "normalize_answer", "option_label"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")
#: An output that opens with an option letter: ``B``, ``B.``, ``B)``, ``(B)``, ``B:`` (alone or before the text).
_LABEL = re.compile(r"^\s*\(?([A-Z])(?:\)|[.:](?!\w))?(?:\s|$)")


def normalize_answer(text: str) -> str:
    """Lower-case, strip accents, punctuation and articles, collapse whitespace (SQuAD-style normalization)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _PUNCT.sub(" ", text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def contains_answer(output: str, answers: Sequence[str]) -> bool:
    """Whether the normalized ``output`` contains any normalized answer as whole words (empty answers never match).

    This looks at one group of answers alone; scoring uses :func:`match_answers`, which also keeps a shorter answer
    from matching inside a longer one of the other group.
    """
    haystack = f" {normalize_answer(output)} "
    return any(f" {normalize_answer(a)} " in haystack for a in answers if normalize_answer(a))


def _occurrences(words: list[str], needle: list[str]) -> list[int]:
    """Start indices of ``needle`` as a whole-word run in ``words``."""
    n = len(needle)
    return [i for i in range(len(words) - n + 1) if words[i:i + n] == needle]


def match_answers(output: str, groups: Sequence[Sequence[str]]) -> list[bool]:
    """Which answer groups (e.g. counterfactual answer + aliases, parametric answer + aliases) ``output`` names.

    Answers are matched as whole words after :func:`normalize_answer`, longest first (by words, then characters).
    The words of every match are claimed: a shorter answer only counts where it does not overlap a longer answer's
    match. So with ``[("York",), ("New York",)]``: ``"New York"`` gives ``[False, True]``, ``"York is nice"``
    ``[True, False]``, ``"New York and York"`` ``[True, True]``. An answer text in several groups hits all of them.

    Args:
        output: The generated text.
        groups: One sequence of answer strings per group; empty answers never match.

    Returns:
        One flag per group, in the order of ``groups``.
    """
    words = normalize_answer(output).split()
    owners: dict[str, set[int]] = {}
    for index, answers in enumerate(groups):
        for answer in answers:
            text = normalize_answer(answer)
            if text:
                owners.setdefault(text, set()).add(index)
    hits = [False] * len(groups)
    claimed = [False] * len(words)
    for text in sorted(owners, key=lambda t: (-len(t.split()), -len(t), t)):
        needle = text.split()
        found = False
        for start in _occurrences(words, needle):
            span = range(start, start + len(needle))
            if any(claimed[i] for i in span):
                continue
            for i in span:
                claimed[i] = True
            found = True
        if found:
            for index in owners[text]:
                hits[index] = True
    return hits


def answers_overlap(first: Sequence[str], second: Sequence[str]) -> bool:
    """Whether a normalized answer of ``first`` contains one of ``second`` as whole words, or the other way round."""
    a = {normalize_answer(x) for x in first} - {""}
    b = {normalize_answer(x) for x in second} - {""}
    return any(f" {x} " in f" {y} " or f" {y} " in f" {x} " for x in a for y in b)


def option_label(output: str, count: int) -> int | None:
    """The option an output names by its letter, as the first thing it says (``"B"``, ``"(B)"``, ``"B. Paris"``).

    A bare capital letter followed by a space and more words ("A dog") is not read as a label; a letter past the
    last option is ignored.

    Args:
        output: The generated text.
        count: How many options the probe has (letters ``A`` .. the ``count``-th letter).

    Returns:
        The option's position, or ``None``.
    """
    match = _LABEL.match(output)
    if match is None:
        return None
    rest = output[match.end():].strip()
    bare = match.group(0).strip() == match.group(1)
    if bare and rest:  # "A dog ...": an article, not a label
        return None
    index = ord(match.group(1)) - ord("A")
    return index if index < count else None


def answer_hits(probe: Probe, text: str) -> list[bool]:
    """Generation mode: which of the probe's answers (:attr:`~ctx_callback.probes.Probe.answers`) ``text`` names.

    The longer answer is matched first: "New York" is no hit for "York" (see :mod:`ctx_callback.matching`). A
    multiple-choice probe's options are one group each (its counterfactual and parametric options with their
    aliases); when its prompt lists them (``list_options``), an output that opens with an option's letter ("B",
    "(B)", "B. ...") names that option as well.
    """
    groups: list[tuple[str, ...]] = [(answer,) for answer in probe.answers]
    groups[probe.counterfactual_index] += probe.counterfactual_aliases
    if probe.parametric_index is not None:
        groups[probe.parametric_index] += probe.parametric_aliases
    hits = match_answers(text, groups)
    if probe.list_options:  # the prompt showed the lettered options: "B" names option B
        label = option_label(text, len(probe.options))
        if label is not None:
            hits[label] = True
    return hits
