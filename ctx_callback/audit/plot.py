"""The audit's histogram: the rule's statistic by category, the cut-off marked (needs matplotlib)."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .result import AuditResult

__all__ = ["plot_histogram"]


def plot_histogram(result: AuditResult, path: str | os.PathLike, *, bins: int = 40) -> str:
    """Draw the histogram of ``result``'s rule statistic by category into ``path``; returns the path.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .rules import statistic_value

    stat = result.rule.statistic
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    groups: dict[str, list[float]] = {}
    for category in ("context_critical", "non_context_critical"):
        found = [statistic_value(r, stat) for r in result.records if r["category"] == category]
        groups[category] = [v for v in found if v is not None and math.isfinite(v)]
    parametric = [r["nll_without_context_sum" if stat.endswith("_sum") else "nll_without_context"]
                  for r in result.records if r["category"] == "parametric"]
    if not stat.startswith("context_gain"):
        groups["parametric (no context)"] = [float(v) for v in parametric if v is not None]
    every = [v for values in groups.values() for v in values]
    if every:
        lo, hi = min(every), max(every)
        edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)] if hi > lo else bins
        for label, group in groups.items():
            if group:
                ax.hist(group, bins=edges, alpha=0.55, label=f"{label} ({len(group)})")
    if result.cutoff is not None:
        ax.axvline(result.cutoff, color="black", linestyle="--", label=f"cut-off {result.cutoff:.3g}")
    ax.set_xlabel(f"{stat} (nats; first {result.settings.get('max_target_tokens')} target tokens)")
    ax.set_ylabel("examples")
    ax.set_title(f"Data audit: {result.rule.description}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.fspath(path)
