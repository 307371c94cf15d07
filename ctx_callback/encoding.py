"""Tokenize probes once into a cached, model-independent encoding.

Every probe gives up to three *variants* (rows of the score table):

- ``"context"``: the counterfactual context + question (the knowledge conflict);
- ``"closed_book"``: the question alone (does the model know the fact?);
- ``"aligned"``: a context that states the true fact + question;
- ``"irrelevant"``: another probe's passage of the same family + question (:mod:`ctx_callback.irrelevant`): the
  answers are that passage's entity (the lure) and the parametric answer. Not scored by default
  (:data:`DEFAULT_VARIANTS`); ``variants=ALL_VARIANTS`` adds it.

Each variant has one prompt and its candidate answers: the counterfactual and the parametric answer for a
two-answer probe (``answer_ids[0]`` and ``answer_ids[1]``), every option in the probe's order for a multiple-choice
probe (:attr:`~ctx_callback.probes.Probe.answers`; its prompt lists the options under the question only when the
probe sets ``list_options``, see :attr:`~ctx_callback.probes.Probe.prompt_question`); engines score any number of
answers per item. Every answer is scored after the *same* prompt tokens, which lets the scoring engine share the
prompt between them.

Token boundary rule, as ``SFTTrainer`` splits prompt-completion data: the prompt's tokens are the longest prefix of
``tokenize(prompt)`` that ``tokenize(prompt + continuation)`` shares, for both answers; each answer's tokens are the
rest of its joint tokenization. Usually the whole prompt is that prefix. When the tokenizer merges across the
boundary (a template ending in a space: ``"A: "`` + ``"Paris"`` is ``"A", ":", " Paris"``), the merged token belongs
to the answer, as in training. The scorer computes exactly these tokens, batched or not.

Prompts longer than ``max_length`` are an error, not a silent truncation: cutting a counterfactual context can
remove the very sentence that states the counterfactual answer, which would turn the probe into noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError, ProbeFormatError, ProbeLengthError
from .formatting import PromptFormat, common_prefix_length
from .irrelevant import IrrelevantPassage, irrelevant_passages
from .probes import Probe

__all__ = ["ALL_VARIANTS", "DEFAULT_VARIANTS", "EncodedItem", "EncodedProbes", "check_lengths", "encode_probes"]

#: Every variant a probe can be encoded in, in column order.
ALL_VARIANTS: tuple[str, ...] = ("context", "closed_book", "aligned", "irrelevant")
#: The variants scored unless told otherwise (the irrelevant-context control is opt-in: one more row per probe).
DEFAULT_VARIANTS: tuple[str, ...] = ("context", "closed_book", "aligned")


@dataclass(frozen=True)
class EncodedItem:
    """One (probe, variant) prompt with its candidate answers, as token ids.

    Attributes:
        probe_index: Index of the probe in the encoded probe list.
        variant: ``"context"``, ``"closed_book"``, ``"aligned"`` or ``"irrelevant"``.
        prompt_text: The rendered prompt.
        prompt_ids: The prompt's tokens (see the module's token boundary rule).
        answer_ids: Every candidate answer's tokens, each non-empty and each continuing ``prompt_ids``. A two-answer
            probe has ``(counterfactual, parametric)``, a multiple-choice probe one entry per option, in the order of
            :attr:`~ctx_callback.probes.Probe.answers`; engines score every entry.
    """

    probe_index: int
    variant: str
    prompt_text: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[tuple[int, ...], ...]

    @property
    def counterfactual_ids(self) -> tuple[int, ...]:
        """The first answer: the counterfactual answer of a two-answer probe (the first option of a multiple-choice
        one)."""
        return self.answer_ids[0]

    @property
    def parametric_ids(self) -> tuple[int, ...]:
        """The second answer: the parametric answer of a two-answer probe."""
        return self.answer_ids[1]

    @property
    def total_length(self) -> int:
        """Prompt plus the longest answer, in tokens (what must fit the model's maximum length)."""
        return len(self.prompt_ids) + max(len(ids) for ids in self.answer_ids)


@dataclass
class EncodedProbes:
    """The tokenized probe set: immutable after :func:`encode_probes`; scoring does no tokenizer work."""

    probes: list[Probe]
    variants: tuple[str, ...]
    items: list[EncodedItem]
    pad_token_id: int
    shared_prefix: tuple[int, ...]
    #: With the ``"irrelevant"`` variant: each probe's passage (``None`` where it has none), else ``None``.
    irrelevant: list[IrrelevantPassage | None] | None = None

    def items_for(self, probe_indices: Sequence[int] | None) -> list[EncodedItem]:
        if probe_indices is None:
            return list(self.items)
        wanted = set(int(i) for i in probe_indices)
        return [item for item in self.items if item.probe_index in wanted]


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def split_prompt_and_answers(
    tokenizer: Any, prompt: str, continuations: Sequence[str], add_special: bool
) -> tuple[list[int], list[list[int]]]:
    """TRL's split, shared by the answers: the prompt is where the tokenized prompt and every joint tokenization agree.

    ``SFTTrainer`` tokenizes the prompt and the prompt + completion, and starts the completion where the two diverge
    (``common_prefix_length``): a prompt ending in a space followed by an answer tokenizes as one `` Paris`` token in
    training, so that token belongs to the answer. Both answers must follow the same prompt tokens (the engines share
    the prompt), so the prompt ends at the shortest such agreement; each answer is the rest of its joint tokenization.
    """
    prompt_ids = _tokenize(tokenizer, prompt, add_special)
    joints = [_tokenize(tokenizer, prompt + continuation, add_special) for continuation in continuations]
    keep = min(common_prefix_length(prompt_ids, joint) for joint in joints)
    return prompt_ids[:keep], [joint[keep:] for joint in joints]


def check_lengths(probes: Sequence[Probe], items: Sequence[EncodedItem], max_length: int | None) -> None:
    """Raise :class:`~ctx_callback.errors.ProbeLengthError` when an item is longer than ``max_length`` tokens.

    Each too-long probe is named once, with its longest variant (``'id' (variant: N tokens)``), in probe order; the
    message lists up to five.

    Args:
        probes: The probes the items' ``probe_index`` points into.
        items: Encoded (probe, variant) items.
        max_length: The model's maximum length in tokens; ``None`` checks nothing.
    """
    if max_length is None:
        return
    longest: dict[int, EncodedItem] = {}
    for item in items:
        if item.total_length > max_length:
            current = longest.get(item.probe_index)
            if current is None or item.total_length > current.total_length:
                longest[item.probe_index] = item
    if not longest:
        return
    too_long = [f"{probes[index].id!r} ({item.variant}: {item.total_length} tokens)"
                for index, item in sorted(longest.items())]
    raise ProbeLengthError(
        f"{len(too_long)} probe(s) do not fit the model's maximum length of {max_length} tokens: "
        f"{', '.join(too_long[:5])}{' ...' if len(too_long) > 5 else ''}. Probes are never truncated (a cut "
        "context may lose the counterfactual statement): shorten or drop these probes."
    )


def pad_token_id_of(tokenizer: Any) -> int:
    """The id batched rows are padded with: the tokenizer's pad token, else its EOS token, else 0 (padding is masked
    out of every forward pass, so any id works; these keep the embedding lookup in range)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad)


def common_prefix(sequences: Sequence[Sequence[int]]) -> tuple[int, ...]:
    if not sequences:
        return ()
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        i = 0
        while i < n and seq[i] == first[i]:
            i += 1
        n = i
    return tuple(first[:n])


def encode_probes(
    probes: Sequence[Probe],
    tokenizer: Any,
    prompt_format: PromptFormat,
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    max_length: int | None = None,
) -> EncodedProbes:
    """Render and tokenize every probe variant once.

    Args:
        probes: Validated probes.
        tokenizer: The training tokenizer.
        prompt_format: How prompts are rendered (see :mod:`ctx_callback.formatting`).
        variants: Which variants to encode; ``"context"`` is always included.
        max_length: Longest allowed prompt + answer in tokens (usually the model's maximum position).

    Raises:
        ProbeLengthError: Probes do not fit ``max_length`` (the message names up to five, each once with its longest
            variant; see :func:`check_lengths`).
        ProbeFormatError: An answer tokenizes to nothing.
        ConfigurationError: Unknown variant name.
    """
    unknown = set(variants) - set(ALL_VARIANTS)
    if unknown:
        raise ConfigurationError(f"Unknown probe variants {sorted(unknown)}; choose from {list(ALL_VARIANTS)}.")
    variants = tuple(v for v in ALL_VARIANTS if v in set(variants) | {"context"})
    add_special = prompt_format.adds_special_tokens
    passages = irrelevant_passages(probes) if "irrelevant" in variants else None
    items: list[EncodedItem] = []
    for index, probe in enumerate(probes):
        passage = None if passages is None else passages[index]
        contexts = {"context": probe.context, "closed_book": None, "aligned": probe.aligned(),
                    "irrelevant": None if passage is None else passage.context}
        for variant in variants:
            if variant in ("aligned", "irrelevant") and contexts[variant] is None:
                continue
            context = contexts[variant]
            question = probe.prompt_question  # a multiple-choice probe lists its options under the question
            prompt = prompt_format.prompt(context, question)
            pair = passage.answers(probe) if variant == "irrelevant" and passage is not None else probe.answers
            continuations = [prompt_format.continuation(context, question, a, prompt=prompt) for a in pair]
            prompt_ids, answer_ids = split_prompt_and_answers(tokenizer, prompt, continuations, add_special)
            if not prompt_ids:
                raise ProbeFormatError(
                    f"probe {probe.id!r} ({variant}): the prompt merges with the answer from its first token; "
                    "end the prompt format on a token boundary (a newline, a colon)."
                )
            answers = []
            for answer, ids in zip(pair, answer_ids):
                if not ids:
                    raise ProbeFormatError(f"probe {probe.id!r}: answer {answer!r} tokenizes to no tokens.")
                answers.append(tuple(ids))
            items.append(EncodedItem(index, variant, prompt, tuple(prompt_ids), tuple(answers)))
    check_lengths(probes, items, max_length)
    pad = pad_token_id_of(tokenizer)
    return EncodedProbes(
        probes=list(probes),
        variants=variants,
        items=items,
        pad_token_id=pad,
        shared_prefix=common_prefix([item.prompt_ids for item in items]),
        irrelevant=passages,
    )
