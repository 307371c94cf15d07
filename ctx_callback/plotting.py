"""Reliance-curve plots (needs matplotlib: ``pip install ctx_callback[plot]``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .metrics import METRIC_PREFIX, METRICS

__all__ = ["plot_reliance"]

#: ``(metric, legend label)`` of the curves drawn: every metric of :data:`METRICS` with a ``plot_label``, in order.
_CURVES: tuple[tuple[str, str], ...] = tuple(
    (spec.name, spec.plot_label) for spec in METRICS if spec.plot_label is not None
)


def plot_reliance(
    log_history: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    monitor_key: str = f"{METRIC_PREFIX}/counterfactual_accuracy",
    stop_step: int | None = None,
    title: str = "Context reliance during training",
    size: tuple[float, float] = (8.0, 4.5),
    dpi: int = 100,
) -> str:
    """Draw the reliance curves from ``trainer_state.json``'s ``log_history`` into a PNG.

    Plots every metric of :data:`~ctx_callback.metrics.METRICS` that has a ``plot_label`` (counterfactual,
    parametric and closed-book accuracy) against the global step, marks the peak of ``monitor_key`` (from the logged
    ``ctx_reliance/peak_step``) and the stop step, and the training loss on a second axis. Where the rows hold the
    monitored metric's interval (``<monitor_key>_ci_low``/``_ci_high``, logged by the callback), it is drawn as a
    band. A monitored metric on the same 0-1 scale that is not one of those curves (``counterfactual_probability``, a
    family's metric) is drawn as well.

    Args:
        log_history: ``trainer_state.json``'s ``log_history`` (or rows in its shape, e.g. from scan results).
        path: The PNG to write.
        monitor_key: The monitored metric's key; labels the smoothed curve.
        stop_step: Step at which training was stopped early, marked when given.
        title: The figure's title.
        size: Figure width and height in inches.
        dpi: Dots per inch (PNG pixels = inches x dpi).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in log_history if f"{METRIC_PREFIX}/counterfactual_accuracy" in r]
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    for metric, label in _CURVES:
        key = f"{METRIC_PREFIX}/{metric}"
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    on_axis = not monitor_key.endswith(("logprob_margin", "context_lift"))  # nats: off this [0, 1] axis
    curve_keys = [f"{METRIC_PREFIX}/{metric}" for metric, _ in _CURVES]
    color = f"C{curve_keys.index(monitor_key)}" if monitor_key in curve_keys else f"C{len(curve_keys) + 1}"
    if on_axis and monitor_key not in curve_keys:  # the monitored metric is not among the curves: draw it too
        points = [(r["step"], r[monitor_key]) for r in rows if monitor_key in r]
        if points:
            ax.plot(*zip(*points), marker="s", markersize=3, color=color,
                    label=f"{monitor_key.split('/', 1)[-1]} (monitored)")
    band = [(r["step"], r[monitor_key + "_ci_low"], r[monitor_key + "_ci_high"]) for r in rows
            if monitor_key + "_ci_low" in r and monitor_key + "_ci_high" in r]
    if band and on_axis:
        steps, low, high = zip(*band)
        ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0,
                        label=f"{monitor_key.split('/')[-1]} 95% interval")
    smoothed = [(r["step"], r[f"{METRIC_PREFIX}/monitor_smoothed"]) for r in rows
                if f"{METRIC_PREFIX}/monitor_smoothed" in r]
    if smoothed:
        ax.plot(*zip(*smoothed), linestyle="--", color="gray", label=f"{monitor_key.split('/')[-1]} (smoothed)")
    peaks = [r.get(f"{METRIC_PREFIX}/peak_step") for r in rows]
    peak_step = next((p for p in reversed(peaks) if p is not None and p == p), None)
    if peak_step is not None:
        ax.axvline(peak_step, color="green", linestyle=":", label=f"peak (step {int(peak_step)})")
    if stop_step is not None:
        ax.axvline(stop_step, color="red", linestyle=":", label=f"stop (step {stop_step})")
    ax.set_xlabel("global step")
    ax.set_ylabel("accuracy" if monitor_key in curve_keys or not on_axis else "accuracy / probability")
    ax.set_ylim(-0.02, 1.02)
    losses = [(r["step"], r["loss"]) for r in log_history if "loss" in r and "step" in r]
    if losses:
        ax2 = ax.twinx()
        ax2.plot(*zip(*losses), color="black", alpha=0.3, linewidth=1, label="training loss")
        ax2.set_ylabel("training loss")
        lines, labels = ax.get_legend_handles_labels()
        lines2, labels2 = ax2.get_legend_handles_labels()
        ax.legend(lines + lines2, labels + labels2, fontsize=7, loc="lower left")
    else:
        ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return os.fspath(path)
