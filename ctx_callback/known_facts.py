"""Known facts, checked with distractors: the ``known_only`` filter's length-matched distractor answers.

``known_only`` keeps a probe when the model, asked the question without context, prefers its parametric answer to its
counterfactual one. One comparison is a coin a model can win without knowing the fact (the counterfactual answer may
just be an unlikely string). The stricter filter of the replication of Goyal et al. ("genuine conflict"): the
parametric answer must also rank above ``k`` **distractors**, answers of the same kind the question does not ask for.

:func:`length_matched_distractors` picks them from the probe set itself: the parametric answers of the other probes
of the family, minus any that overlap one of the probe's own answers (:func:`~ctx_callback.matching.answers_overlap`),
the ``k`` whose token length is closest to the parametric answer's (a short answer is not compared with long ones,
whose log-likelihood sums more tokens), ties broken by probe order after the probe (wrapping). A family with fewer
than ``k`` other answers gives what it has. Multiple-choice probes get none: their options already compete.

:func:`distractor_items` encodes the closed-book prompt with ``(parametric, distractor_1, ..., distractor_k)`` as the
answers, with the same prompt format and token boundary rule as every probe row, so the comparison is in the training
format. The scorer (:meth:`~ctx_callback.scoring.ProbeScorer.known_probe_indices`) scores them with the batched
engine and keeps a probe when its parametric answer beats every distractor as well as the other answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .encoding import EncodedItem, split_prompt_and_answers
from .errors import ConfigurationError
from .formatting import PromptFormat
from .matching import answers_overlap, normalize_answer
from .probes import Probe, family_rings

__all__ = ["DEFAULT_KNOWN_DISTRACTORS", "check_distractors", "distractor_items", "length_matched_distractors"]

#: Distractors per probe for ``known_only`` unless told otherwise.
DEFAULT_KNOWN_DISTRACTORS = 3


def check_distractors(value: Any) -> int:
    """Validate ``known_distractors``: an integer >= 0.

    Raises:
        ConfigurationError: Another value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(
            f"known_distractors must be an integer >= 0 (with known_only: how many length-matched answers of other "
            f"probes the parametric answer must also beat closed-book; 0 = the counterfactual one alone), got "
            f"{value!r}.")
    return value


def length_matched_distractors(probes: Sequence[Probe], tokenizer: Any, k: int) -> list[tuple[str, ...]]:
    """Up to ``k`` distractor answers per probe, in probe order (module docstring); ``()`` for multiple choice."""
    if k == 0:
        return [() for _ in probes]
    lengths: dict[str, int] = {}

    def length(text: str) -> int:
        if text not in lengths:
            lengths[text] = len(tokenizer(" " + text, add_special_tokens=False)["input_ids"])
        return lengths[text]

    out: list[tuple[str, ...]] = []
    for probe, ring in zip(probes, family_rings(probes)):
        if probe.options or probe.parametric_answer is None:
            out.append(())
            continue
        seen: set[str] = set()
        candidates: list[tuple[int, int, str]] = []
        for order, j in enumerate(ring):
            answer = probes[j].parametric_answer
            if answer is None or probes[j].options or normalize_answer(answer) in seen:
                continue
            if answers_overlap([answer], probe.surface_forms):
                continue
            seen.add(normalize_answer(answer))
            candidates.append((abs(length(answer) - length(probe.parametric_answer)), order, answer))
        out.append(tuple(answer for _, _, answer in sorted(candidates)[:k]))
    return out


def distractor_items(probes: Sequence[Probe], distractors: Sequence[tuple[str, ...]], tokenizer: Any,
                     prompt_format: PromptFormat) -> list[EncodedItem]:
    """The closed-book rows ``(parametric, *distractors)`` of the probes that have distractors (``probe_index`` is
    the probe's position in ``probes``)."""
    items = []
    for index, (probe, extra) in enumerate(zip(probes, distractors)):
        if not extra:
            continue
        assert probe.parametric_answer is not None
        prompt = prompt_format.prompt(None, probe.prompt_question)
        answers = (probe.parametric_answer, *extra)
        continuations = [prompt_format.continuation(None, probe.prompt_question, a, prompt=prompt) for a in answers]
        prompt_ids, answer_ids = split_prompt_and_answers(tokenizer, prompt, continuations,
                                                          prompt_format.adds_special_tokens)
        items.append(EncodedItem(index, "closed_book", prompt, tuple(prompt_ids), tuple(map(tuple, answer_ids))))
    return items
