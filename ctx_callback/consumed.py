"""What the training batches since the previous probe event held, by audit category.

Given an audit of the training dataset (:func:`ctx_callback.audit.audit_dataset`, or the JSONL that
``ctx-callback audit --out FILE`` writes: one record per dataset row with its ``index`` and ``category``), the callback
logs at every probe event the share of each category among the examples the optimizer steps since the previous event
consumed (:data:`CONSUMED_KEYS`). The paper's culprit is the non-context-critical share (context that repeats what the
model already knows): where it rises, reliance is expected to fall.

The examples are found by following the Trainer's sampler, never by touching it (no iteration, no RNG draw), so
training is unchanged. :class:`ConsumedData` follows what it can reproduce exactly:

- a sequential sampler (``train_sampling_strategy="sequential"``): rows in dataset order, epoch after epoch;
- accelerate's ``SeedableRandomSampler`` (the Trainer's default random sampler): epoch ``e`` is
  ``torch.randperm(n)`` drawn from a generator seeded with ``initial_seed + e``, as the sampler draws it;

in one process, with batches of ``per_device_train_batch_size`` and ``gradient_accumulation_steps`` batches per
optimizer step (fewer for an epoch's last step), as ``Trainer._run_epoch`` groups them. Anything else is skipped with
one warning saying why and nothing is logged: another sampler (length-grouped, weighted, custom), an iterable or
streamed dataset, packed data (rows no longer match the audit's), a dataset whose length differs from the audit's,
and distributed training (not followed in this version).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ConfigurationError
from .messages import rank_zero_warn
from .metrics import METRIC_PREFIX

__all__ = ["CONSUMED_CATEGORIES", "CONSUMED_KEYS", "ConsumedData", "read_audit_categories"]

#: The audit categories whose share is logged (the others, ``too_long`` and ``invalid``, make up the rest).
CONSUMED_CATEGORIES = ("context_critical", "non_context_critical", "parametric")
#: The logged keys: the examples consumed since the previous event, and each category's share of them.
CONSUMED_KEYS = {"examples": f"{METRIC_PREFIX}/consumed/examples",
                 **{c: f"{METRIC_PREFIX}/consumed/{c}_share" for c in CONSUMED_CATEGORIES}}


def read_audit_categories(audit: Any) -> list[str]:
    """The category of each dataset row, in dataset order, from an ``AuditResult``, its records, or the JSONL file
    ``ctx-callback audit --out`` writes.

    Raises:
        ConfigurationError: A file that cannot be read, or records without a complete ``index`` / ``category``.
    """
    if isinstance(audit, (str, os.PathLike)):
        try:
            with open(audit, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as err:
            raise ConfigurationError(
                f"audit={str(audit)!r} cannot be read as the JSONL `ctx-callback audit --out FILE` writes "
                f"({type(err).__name__}: {err}).") from err
    else:
        records = list(getattr(audit, "records", audit))
    by_index: dict[int, str] = {}
    for number, record in enumerate(records, start=1):
        index, category = (record.get("index"), record.get("category")) if isinstance(record, dict) else (None, None)
        if not isinstance(index, int) or not isinstance(category, str):
            raise ConfigurationError(
                f"audit record {number} has no integer 'index' and string 'category' (got {record!r:.120}); pass an "
                "AuditResult or the JSONL `ctx-callback audit --out FILE` writes.")
        by_index[index] = category
    if sorted(by_index) != list(range(len(by_index))):
        raise ConfigurationError(
            f"the audit's {len(by_index)} records do not cover the indices 0..{len(by_index) - 1} exactly once: "
            "audit the whole training dataset.")
    return [by_index[i] for i in range(len(by_index))]


class ConsumedData:
    """Follows the Trainer's sampler to tell which audited rows each optimizer step consumed (module docstring).

    Args:
        categories: Each dataset row's audit category (:func:`read_audit_categories`).
    """

    def __init__(self, categories: Sequence[str]) -> None:
        self.categories = np.asarray(list(categories), dtype=object)
        self.skip_reason: str | None = None
        self._plan: dict[str, Any] | None = None

    def follow(self, trainer: Any, dataloader: Any) -> None:
        """At train begin: learn the sampler, batch size and accumulation of ``trainer``'s ``dataloader``, or why
        they cannot be followed (warned once; :attr:`skip_reason`)."""
        self._plan, self.skip_reason = None, None
        try:
            self._plan = self._make_plan(trainer, dataloader)
        except _Unfollowable as err:
            self.skip_reason = str(err)
            rank_zero_warn("ctx_callback: audit given, but the consumed training examples are not logged: %s.",
                           self.skip_reason)

    def _make_plan(self, trainer: Any, dataloader: Any) -> dict[str, Any]:
        import torch  # noqa: PLC0415 - a light module otherwise
        from torch.utils.data import IterableDataset, SequentialSampler  # noqa: PLC0415

        args = trainer.args
        if args.world_size > 1:
            raise _Unfollowable(f"distributed training ({args.world_size} processes) is not followed in this version")
        if getattr(args, "packing", False):
            raise _Unfollowable("packed rows (packing=True) are not the audited rows")
        dataset = getattr(trainer, "train_dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise _Unfollowable("the training dataset is iterable or streamed: it has no order to follow")
        if len(dataset) != len(self.categories):
            raise _Unfollowable(
                f"the trainer's training dataset has {len(dataset)} rows and the audit {len(self.categories)} (rows "
                "dropped or added after the audit, e.g. by filtering or packing): audit the dataset you train on")
        batch_sampler = getattr(dataloader, "batch_sampler", None)
        sampler = getattr(batch_sampler, "sampler", None)
        batch_size = getattr(batch_sampler, "batch_size", None)
        plan = {"n": len(dataset), "batch_size": batch_size, "drop_last": getattr(batch_sampler, "drop_last", False),
                "accumulation": int(args.gradient_accumulation_steps), "batches": len(dataloader)}
        if type(batch_sampler).__name__ != "BatchSampler" or not isinstance(batch_size, int):
            raise _Unfollowable(f"batches come from a {type(batch_sampler).__name__}, not a plain BatchSampler")
        if isinstance(sampler, SequentialSampler):
            return {**plan, "seed": None}
        if type(sampler).__name__ == "SeedableRandomSampler" and not sampler.replacement and (
                sampler.num_samples == plan["n"]):
            plan["seed"] = int(sampler.initial_seed)
            plan["generator_device"] = torch.get_default_device()
            return plan
        raise _Unfollowable(f"the sampler is a {type(sampler).__name__}, whose order cannot be reproduced "
                            "(sequential and accelerate's SeedableRandomSampler are)")

    def _order(self, epoch: int) -> np.ndarray:
        import torch  # noqa: PLC0415

        plan = self._plan
        assert plan is not None
        if plan["seed"] is None:
            return np.arange(plan["n"])
        generator = torch.Generator(device=plan["generator_device"])
        generator.manual_seed(plan["seed"] + epoch)
        return torch.randperm(plan["n"], generator=generator).numpy()

    def indices(self, start_step: int, end_step: int) -> np.ndarray:
        """The dataset rows consumed by optimizer steps ``start_step + 1`` to ``end_step`` (global steps, 1-based)."""
        plan = self._plan
        assert plan is not None
        per_epoch = max(math.ceil(plan["batches"] / plan["accumulation"]), 1)
        orders: dict[int, np.ndarray] = {}
        out = []
        for step in range(start_step + 1, end_step + 1):
            epoch, update = divmod(step - 1, per_epoch)
            order = orders.setdefault(epoch, self._order(epoch))
            first = update * plan["accumulation"]
            last = min(first + plan["accumulation"], plan["batches"])
            size = plan["batch_size"]
            out.append(order[first * size:last * size])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def row(self, previous_step: int | None, step: int) -> dict[str, float]:
        """The logged keys for the examples consumed since ``previous_step`` (none before the first event, or when
        the sampler cannot be followed)."""
        if self._plan is None or previous_step is None or step <= previous_step:
            return {}
        consumed = self.categories[self.indices(previous_step, step)]
        total = len(consumed)
        row = {CONSUMED_KEYS["examples"]: float(total)}
        for category in CONSUMED_CATEGORIES:
            row[CONSUMED_KEYS[category]] = float(np.sum(consumed == category) / total) if total else math.nan
        return row


class _Unfollowable(Exception):
    """Why the sampler cannot be followed (a warning, not an error)."""
