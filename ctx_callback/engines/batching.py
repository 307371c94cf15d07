"""Length-sorted batching within a token budget and a row budget, apart from any model.

Every engine cuts its work into forward passes with the same rule: sort the units (an item, or an item's pair of
answer rows) by length, then fill each batch in that order until one more unit would push ``rows x longest`` over
``max_batch_tokens`` or the row count over ``max_batch_size``. Sorting keeps padding small; sorting by
``(length, index)`` makes the batches deterministic, which matters for the numbers (the same batches give the same
float sums) and under parameter sharding (every rank must run the same forward passes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigurationError

__all__ = ["Batcher"]


@dataclass(frozen=True)
class Batcher:
    """Length-sorted batches of unit indices within a token and a row budget.

    Args:
        max_batch_tokens: Padded tokens per batch: rows x the longest unit's length.
        max_batch_size: Rows per batch.

    Raises:
        ConfigurationError: A budget below 1.
    """

    max_batch_tokens: int = 8192
    max_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_size < 1:
            raise ConfigurationError(
                f"max_batch_tokens and max_batch_size must be >= 1, got {self.max_batch_tokens}, {self.max_batch_size}."
            )

    def batches(self, lengths: Sequence[int], rows_per_unit: int | Sequence[int] = 1) -> list[list[int]]:
        """Cut units into batches, shortest first.

        Args:
            lengths: Length in tokens of each unit (the padded width it needs).
            rows_per_unit: Rows each unit occupies in the batch (2 when both answers of an item run side by side):
                one number for every unit, or one per unit (items with different numbers of answers).

        Returns:
            Lists of indices into ``lengths``: every index exactly once, in ``(length, index)`` order across and
            within batches. A batch exceeds a budget only when it holds a single unit that alone exceeds it.
        """
        rows_of = [rows_per_unit] * len(lengths) if isinstance(rows_per_unit, int) else list(rows_per_unit)
        if len(rows_of) != len(lengths):
            raise ConfigurationError(f"rows_per_unit has {len(rows_of)} entries for {len(lengths)} units.")
        if any(r < 1 for r in rows_of):
            raise ConfigurationError(f"rows_per_unit must be >= 1, got {min(rows_of)}.")
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        current_rows = 0
        for i in order:
            new_longest = max(longest, lengths[i])
            rows = current_rows + rows_of[i]
            if current and (rows * new_longest > self.max_batch_tokens or rows > self.max_batch_size):
                batches.append(current)
                current, new_longest, current_rows = [], lengths[i], 0
            current.append(i)
            current_rows += rows_of[i]
            longest = new_longest
        if current:
            batches.append(current)
        return batches
