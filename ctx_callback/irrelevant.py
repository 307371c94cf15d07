"""The irrelevant-context variant: each probe asked after a passage that states *another* fact of its family.

A model that copies whatever the passage says scores perfectly on every counterfactual metric; the opposite failure,
a distracting passage overriding what the model knows, is what retrieval users fear most. The ``"irrelevant"`` probe
variant measures it (CUB, Hagström et al. 2025, scores context utilisation on gold, conflicting and irrelevant
contexts together): the question of probe *i* follows the passage of another probe *j* of the same family, which is
on-topic-looking but says nothing about *i*, so the right answer is *i*'s parametric answer and the tempting wrong one
is the entity *j*'s passage states (the **lure**).

Built from the probe set itself, no new data: :func:`irrelevant_passages` pairs every probe with the first other probe
after it (in probe order, wrapping around) of the same family, preferring one with the same ``metadata["relation"]``
(another capital for a capital), whose passage can serve:

- the passage is *j*'s aligned context (a true statement) with *j*'s parametric answer as the lure, or, when *j* has
  no aligned context, *j*'s counterfactual context with its counterfactual answer as the lure;
- the lure must not overlap any of *i*'s answers (:func:`~ctx_callback.matching.answers_overlap`), and the passage
  must not name one of them (else it would be relevant after all).

A probe whose context is an instruction about the answer (``metadata["context_kind"] == "instruction"``: the built-in
``quotes`` suite and the ``memotrap`` preset, *Write a quote that ends in the word "heavy"*) never lends it: such a
passage applies to any question, so borrowing it makes a second counterfactual probe, not an irrelevant one. A probe
with no partner, or without a known parametric answer, has no irrelevant row (like the aligned control); metrics over
the irrelevant variant skip it.
The pairing depends only on the probe list, so every rank, every resumed run and ``ctx-callback scan`` build the same
passages. A two-answer probe is scored on ``(lure, parametric answer)``; a multiple-choice probe on its own options
(the passage names none of them), and is robust when its parametric option still wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .matching import answer_hits, answers_overlap, contains_answer, match_answers
from .probes import Probe, family_rings

__all__ = ["INSTRUCTION", "IrrelevantPassage", "irrelevant_passages"]

#: ``metadata["context_kind"]`` of a probe whose context is an instruction about the answer (MemoTrap: *Write a quote
#: that ends in the word "heavy"*): it applies to any question, so it is never lent as an irrelevant passage.
INSTRUCTION = "instruction"


@dataclass(frozen=True)
class IrrelevantPassage:
    """The passage a probe is asked after in its ``"irrelevant"`` variant.

    Attributes:
        source_id: The id of the probe whose passage it is.
        context: The passage.
        lure: The entity the passage states (the tempting wrong answer): the source probe's parametric answer when the
            passage is its aligned context, else its counterfactual answer.
    """

    source_id: str
    context: str
    lure: str

    def answers(self, probe: Probe) -> tuple[str, ...]:
        """The answers ``probe`` is scored on after this passage: ``(lure, parametric)``, or its options."""
        if probe.options:
            return probe.options
        assert probe.parametric_answer is not None
        return (self.lure, probe.parametric_answer)

    def hits(self, probe: Probe, text: str) -> list[bool]:
        """Generation mode: which of :meth:`answers` ``text`` names (the parametric answer with its aliases)."""
        if probe.options:
            return answer_hits(probe, text)
        assert probe.parametric_answer is not None
        return match_answers(text, [(self.lure,), (probe.parametric_answer, *probe.parametric_aliases)])


def _passage_of(source: Probe) -> tuple[str, str] | None:
    """``(passage, lure)`` that ``source`` lends: its aligned context and parametric answer, else its context;
    ``None`` for an instruction (``metadata["context_kind"] == "instruction"``)."""
    if source.metadata and source.metadata.get("context_kind") == INSTRUCTION:
        return None
    aligned = source.aligned()
    if aligned is not None and source.parametric_answer is not None:
        return aligned, source.parametric_answer
    return source.context, source.counterfactual_answer


def _serves(probe: Probe, passage: str, lure: str) -> bool:
    """Whether ``passage`` is irrelevant to ``probe``: its lure and text name none of ``probe``'s answers."""
    answers = probe.surface_forms
    return not answers_overlap([lure], answers) and not contains_answer(passage, answers)


def irrelevant_passages(probes: Sequence[Probe]) -> list[IrrelevantPassage | None]:
    """One irrelevant passage per probe, in probe order (``None`` where none can be built; module docstring)."""
    return [None if probe.parametric_answer is None else _partner(probe, [probes[j] for j in ring])
            for probe, ring in zip(probes, family_rings(probes))]


def _partner(probe: Probe, ring: list[Probe]) -> IrrelevantPassage | None:
    """The first serving passage of the other probes of the family (``ring``, in order), same relation first."""
    relation = probe.relation
    ordered = [p for p in ring if relation is not None and p.relation == relation]
    ordered += [p for p in ring if relation is None or p.relation != relation]
    for source in ordered:
        lent = _passage_of(source)
        if lent is not None and _serves(probe, *lent):
            return IrrelevantPassage(source.id, *lent)
    return None
