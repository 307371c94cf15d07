"""Score training examples with and without their context, on the probe engines (no second forward pass).

Each example becomes one or two :class:`~ctx_callback.encoding.EncodedItem` rows with a single answer, the training
target: ``"context"`` (the prompt with the example's context) and ``"closed_book"`` (the same question without it).
The prompt/target token split is the one :mod:`ctx_callback.encoding` uses for probes, which is how ``SFTTrainer``
splits prompt-completion data; the target is cut to its first ``max_target_tokens`` tokens. The rows are scored by a
log-likelihood engine from :mod:`ctx_callback.engines` (``"auto"``: the shared-prefix cache where the prompts share a
preamble) under :func:`~ctx_callback.scoring.probe_mode` and :func:`~ctx_callback.scoring.probe_autocast`, so the
numbers are the ones the probes' scorer would compute, and ``probe_dtype="bfloat16"`` works the same way.

From the summed log-probability ``s`` of the ``n`` scored target tokens come both statistics the rules use: the summed
NLL ``-s`` and the mean per-token NLL ``-s / n``.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..encoding import EncodedItem, EncodedProbes, common_prefix, split_prompt_and_answers
from ..errors import AuditDataError
from ..formatting import PromptFormat
from .adapters import AuditExample

__all__ = ["EncodedExample", "encode_example", "example_key", "score_encoded"]

#: Item variants: the prompt with the example's context, and without it.
WITH, WITHOUT = "context", "closed_book"


def example_key(example: AuditExample) -> str:
    """A short hash of an example's index and texts: a cached score is reused only for the same example."""
    payload = json.dumps([example.index, example.context, example.question, example.answer])
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


@dataclass
class EncodedExample:
    """One example's tokens, stored compactly (``array('i')``) until it is scored.

    Attributes:
        example: The example.
        prompts: ``{variant: prompt ids}`` for ``"context"`` (when the example has one) and ``"closed_book"``.
        targets: ``{variant: target ids}``, each cut to ``max_target_tokens``.
        target_tokens: The full target's length in tokens (before the cut; without context).
        longest: The longest prompt + scored target, in tokens.
    """

    example: AuditExample
    prompts: dict[str, array]
    targets: dict[str, array]
    target_tokens: int
    longest: int

    @property
    def truncated(self) -> bool:
        """Whether only the first part of the target is scored."""
        return len(self.targets[WITHOUT]) < self.target_tokens

    def items(self, position: int) -> list[EncodedItem]:
        """The rows to score, ``probe_index`` = ``position`` (the example's place in the scoring call)."""
        return [EncodedItem(position, variant, "", tuple(self.prompts[variant]), (tuple(self.targets[variant]),))
                for variant in (WITH, WITHOUT) if variant in self.prompts]


def encode_example(
    example: AuditExample, tokenizer: Any, prompt_format: PromptFormat, max_target_tokens: int
) -> EncodedExample:
    """Render and tokenize one example with and without its context (see the module docstring).

    Raises:
        AuditDataError: The target tokenizes to nothing, or the prompt merges with the target from its first token.
    """
    add_special = prompt_format.adds_special_tokens
    prompts: dict[str, array] = {}
    targets: dict[str, array] = {}
    full = 0
    variants = [(WITH, example.context), (WITHOUT, None)] if example.context is not None else [(WITHOUT, None)]
    for variant, context in variants:
        prompt = prompt_format.prompt(context, example.question)
        continuation = prompt_format.continuation(context, example.question, example.answer, prompt=prompt)
        prompt_ids, (target_ids,) = split_prompt_and_answers(tokenizer, prompt, [continuation], add_special)
        if not target_ids:
            raise AuditDataError(f"example {example.index}: the target {example.answer[:60]!r} tokenizes to no tokens.")
        if not prompt_ids:
            raise AuditDataError(
                f"example {example.index}: the prompt merges with the target from its first token; end the prompt "
                "format on a token boundary (a newline, a colon)."
            )
        prompts[variant] = array("i", prompt_ids)
        targets[variant] = array("i", target_ids[:max_target_tokens])
        if variant == WITHOUT:
            full = len(target_ids)
    longest = max(len(prompts[v]) + len(targets[v]) for v in prompts)
    return EncodedExample(example, prompts, targets, full, longest)


def score_encoded(
    model: Any,
    encoded: Sequence[EncodedExample],
    *,
    pad_token_id: int,
    engine: str = "auto",
    max_batch_tokens: int = 8192,
    max_batch_size: int = 64,
    probe_dtype: str | None = None,
) -> list[dict[str, Any]]:
    """Score a chunk of encoded examples with one engine call.

    Args:
        model: The causal LM (called as given).
        encoded: The examples to score.
        pad_token_id: Padding id for batched rows.
        engine: ``"auto"`` or a name in :data:`~ctx_callback.engines.LOGLIK_ENGINES`.
        max_batch_tokens: Padded tokens per forward pass.
        max_batch_size: Rows per forward pass.
        probe_dtype: ``None`` or ``"bfloat16"``/``"float16"``: autocast dtype (see
            :func:`~ctx_callback.scoring.probe_autocast`).

    Returns:
        Per example: ``logprob_with`` / ``logprob_without`` (summed over the scored target tokens; ``None`` for the
        with-context side of an example without context) and ``tokens_with`` / ``tokens_without``.
    """
    from ..engines import Batcher, create_loglik_engine
    from ..scoring import probe_autocast, probe_mode

    items = [item for position, enc in enumerate(encoded) for item in enc.items(position)]
    out: list[dict[str, Any]] = [{"logprob_with": None, "logprob_without": None, "tokens_with": 0,
                                  "tokens_without": 0} for _ in encoded]
    if not items:
        return out
    probes = EncodedProbes(probes=[], variants=(WITH, WITHOUT), items=items, pad_token_id=int(pad_token_id),
                           shared_prefix=common_prefix([item.prompt_ids for item in items]))
    batcher = Batcher(max_batch_tokens, max_batch_size)
    scorer = create_loglik_engine(engine, probes, batcher)
    if not scorer.applicable(items):
        scorer = create_loglik_engine("batched", probes, batcher)
    with probe_mode(model), probe_autocast(model, probe_dtype):
        values = scorer.score(model, items)
    for item, (value,) in zip(items, values):
        side = "with" if item.variant == WITH else "without"
        out[item.probe_index][f"logprob_{side}"] = float(value)
        out[item.probe_index][f"tokens_{side}"] = len(item.answer_ids[0])
    return out
