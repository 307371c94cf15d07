"""The result of an audit: one record per dataset row, the rule that categorised them, its cut-off, the settings.

:class:`AuditResult` holds them and gives counts, a summary, the CLI's table and a JSONL file;
:func:`example_record` builds one row's record from its scores; :func:`apply_rule` / :func:`rule_cutoff` put the
rule's categories on the records (again, without a forward pass, in :meth:`AuditResult.recategorize`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import AuditExample
from .rules import CATEGORIES, AuditRule, categorize, resolve_rule

if TYPE_CHECKING:  # the encoder needs torch; a record only reads its token counts
    from .scoring import EncodedExample

__all__ = ["AuditResult", "apply_rule", "example_record", "rule_cutoff"]


@dataclass
class AuditResult:
    """Per-example records, the rule and its cut-off, and the settings of an audit.

    Attributes:
        records: One dict per dataset row, in dataset order: ``index``, ``category``, ``has_context``,
            ``nll_with_context`` / ``nll_without_context`` (mean per scored target token), ``context_gain``
            (without - with, per token), the summed ``nll_with_context_sum`` / ``nll_without_context_sum``,
            ``target_tokens`` (full target), ``scored_tokens`` (at most ``max_target_tokens``), ``truncated``,
            ``too_long``, ``row_key`` (a hash of the row's content in the columns the audit read, see
            :func:`row_keys`). Rows that could not be audited (empty target with ``invalid='skip'``) have category
            ``"invalid"`` and no scores.
        rule: The rule that assigned the categories.
        cutoff: The statistic's cut-off value (the largest flagged value for a quantile rule, the threshold for a
            threshold rule; ``None`` when nothing was flagged).
        settings: Format, columns, ``key_columns`` (those the row keys hash), prompt format, ``max_target_tokens``,
            precision, engine, model.
        seconds: Scoring wall time of this call (cached examples excluded).
        scored_now: Examples scored by this call (the others came from ``resume_file``; a chunk only partly in it is
            scored again in full).
    """

    records: list[dict[str, Any]]
    rule: AuditRule
    cutoff: float | None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    scored_now: int = 0

    @property
    def categories(self) -> list[str]:
        """The category of each dataset row."""
        return [record["category"] for record in self.records]

    def indices(self, category: str) -> list[int]:
        """Dataset indices of the rows in ``category``."""
        return [record["index"] for record in self.records if record["category"] == category]

    def counts(self) -> dict[str, int]:
        """Rows per category (every category of :data:`~ctx_callback.audit.rules.CATEGORIES`, zeros included)."""
        counts = dict.fromkeys(CATEGORIES, 0)
        for record in self.records:
            counts[record["category"]] = counts.get(record["category"], 0) + 1
        return counts

    def recategorize(self, rule: str | AuditRule = "default", **overrides: Any) -> AuditResult:
        """The same scores under another rule (no forward pass): ``result.recategorize("paper")``."""
        new_rule = resolve_rule(rule, **overrides)
        records = [dict(record) for record in self.records]
        apply_rule(records, new_rule)
        cutoff = rule_cutoff(records, new_rule)
        return AuditResult(records, new_rule, cutoff, dict(self.settings), self.seconds, self.scored_now)

    @property
    def summary(self) -> dict[str, Any]:
        """Counts and shares per category, the rule, its cut-off, the target cut, truncated and too-long rows."""
        counts = self.counts()
        total = len(self.records)
        too_long = self.indices("too_long")
        return {
            "rows": total,
            "counts": counts,
            "shares": {k: (v / total if total else 0.0) for k, v in counts.items()},
            "rule": self.rule.to_dict(),
            "rule_description": self.rule.description,
            "cutoff": self.cutoff,
            "max_target_tokens": self.settings.get("max_target_tokens"),
            "truncated_targets": sum(1 for r in self.records if r.get("truncated")),
            "too_long": len(too_long),
            "too_long_indices": too_long[:20],
            "invalid": counts.get("invalid", 0),
            "settings": self.settings,
            "seconds": self.seconds,
            "scored_now": self.scored_now,
        }

    def table(self) -> str:
        """The summary as a small text table (what the CLI prints)."""
        counts = self.counts()
        total = max(len(self.records), 1)
        lines = [f"{'category':<22} {'examples':>9} {'share':>7}", "-" * 40]
        for category, count in counts.items():
            if count or category in CATEGORIES[:3]:
                lines.append(f"{category:<22} {count:>9} {count / total:>7.1%}")
        lines.append("-" * 40)
        lines.append(f"{'total':<22} {len(self.records):>9}")
        cut = "none flagged" if self.cutoff is None else f"{self.cutoff:.4g}"
        lines.append(f"rule {self.rule.description}; cut-off {cut}")
        truncated = sum(1 for r in self.records if r.get("truncated"))
        lines.append(f"targets scored on their first {self.settings.get('max_target_tokens')} tokens "
                     f"({truncated} truncated)")
        return "\n".join(lines)

    def to_jsonl(self, path: str | os.PathLike) -> str:
        """Write one JSON line per row (atomically); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            for record in self.records:
                f.write(json.dumps({k: v for k, v in record.items() if k != "key"}) + "\n")
        os.replace(tmp, path)
        return os.fspath(path)

    def plot_histogram(self, path: str | os.PathLike, *, bins: int = 40) -> str:
        """Histogram of the rule's statistic by category, the cut-off marked (needs matplotlib); see
        :func:`~ctx_callback.audit.plot.plot_histogram`."""
        from .plot import plot_histogram

        return plot_histogram(self, path, bins=bins)


def apply_rule(records: list[dict[str, Any]], rule: AuditRule) -> None:
    """Put ``rule``'s category on every record that is not ``"invalid"``, in place."""
    judged = [r for r in records if r["category"] != "invalid"]
    categories, _ = categorize(judged, rule)
    for record, category in zip(judged, categories):
        record["category"] = category


def rule_cutoff(records: list[dict[str, Any]], rule: AuditRule) -> float | None:
    """``rule``'s cut-off over the records that are not ``"invalid"`` (see
    :func:`~ctx_callback.audit.rules.categorize`)."""
    _, cutoff = categorize([r for r in records if r["category"] != "invalid"], rule)
    return cutoff


def example_record(example: AuditExample, key: str, enc: EncodedExample | None, scores: Mapping[str, Any] | None,
                   too_long: bool) -> dict[str, Any]:
    """One example's audit record, not yet categorised: its scores turned into the NLLs and context gain.

    Args:
        example: The example.
        key: Its resume-file key (:func:`~ctx_callback.audit.resume.score_key`).
        enc: Its encoding when scored now (token counts), ``None`` when the scores come from the resume file.
        scores: Its raw scores (:func:`~ctx_callback.audit.scoring.score_encoded`, or a resume-file row), ``None``
            when it was not scored (too long).
        too_long: Whether it is longer than the model accepts.
    """
    record: dict[str, Any] = {
        "index": example.index, "key": key, "category": "", "has_context": example.context
        is not None, "too_long": too_long,
    }
    lw = scores.get("logprob_with") if scores else None
    lo = scores.get("logprob_without") if scores else None
    tw = scores.get("tokens_with", 0) if scores else 0
    to = scores.get("tokens_without", 0) if scores else 0
    record.update(
        logprob_with=lw, logprob_without=lo, scored_tokens=to,
        nll_with_context=None if lw is None else -lw / tw,
        nll_without_context=None if lo is None else -lo / to,
        nll_with_context_sum=None if lw is None else -lw,
        nll_without_context_sum=None if lo is None else -lo,
    )
    record["context_gain"] = (None if lw is None or lo is None
                              else record["nll_without_context"] - record["nll_with_context"])
    if enc is not None:
        record.update(target_tokens=enc.target_tokens, truncated=enc.truncated, prompt_tokens=enc.longest - to)
    elif scores is not None:
        record.update(target_tokens=scores.get("target_tokens"), truncated=scores.get("truncated", False),
                      prompt_tokens=scores.get("prompt_tokens"))
    return record

