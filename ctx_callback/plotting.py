"""Reliance-curve plots (needs matplotlib: ``pip install ctx_callback[plot]``).

:func:`plot_data` picks what a plot shows from ``log_history``-style rows (pure Python, no matplotlib);
:func:`plot_reliance` draws exactly that into a PNG and records a summary of it (:meth:`PlotData.to_json`) in the
file, as the PNG text chunk :data:`PNG_METADATA_KEY`, so that what a plot was drawn from can be read back from the
plot itself (``PIL.Image.open(path).text["ctx_callback"]``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .metrics import METRIC_PREFIX, METRICS

__all__ = ["PNG_METADATA_KEY", "PlotData", "Series", "plot_curves", "plot_data", "plot_reliance"]


def plot_curves() -> tuple[tuple[str, str], ...]:
    """The curves drawn, read from the metric definitions at call time (a registered metric's curve included).

    Returns:
        ``(metric, legend label)`` of every metric of :data:`~ctx_callback.metrics.METRICS` with a ``plot_label``,
        in table order.
    """
    return tuple((spec.name, spec.plot_label) for spec in METRICS if spec.plot_label is not None)


#: The PNG text chunk that holds :meth:`PlotData.to_json` of the drawn data.
PNG_METADATA_KEY = "ctx_callback"

_ANCHOR = f"{METRIC_PREFIX}/counterfactual_accuracy"  # a row with it is a probe event
_SMOOTHED = f"{METRIC_PREFIX}/monitor_smoothed"
_PEAK_STEP = f"{METRIC_PREFIX}/peak_step"


@dataclass(frozen=True)
class Series:
    """One drawn line: a logged key, its legend label and its ``(step, value)`` points in row order.

    Attributes:
        key: The logged key (``ctx_reliance/counterfactual_accuracy``, ``loss``, ...).
        label: The legend label.
        points: ``(step, value)`` pairs.
    """

    key: str
    label: str
    points: tuple[tuple[float, float], ...]

    @property
    def steps(self) -> list[float]:
        """The steps of the points."""
        return [step for step, _ in self.points]


@dataclass(frozen=True)
class PlotData:
    """What a reliance plot shows (:func:`plot_data`); :func:`plot_reliance` draws this and nothing else.

    Attributes:
        monitor_key: The monitored metric's key.
        curves: The accuracy curves (metrics of :data:`~ctx_callback.metrics.METRICS` with a ``plot_label``) that have
            points, in table order, then the monitored metric when it is on the 0-1 axis but not one of them.
        band: ``(step, low, high)`` of the monitored metric's interval, where logged (and on the 0-1 axis).
        smoothed: The smoothed monitored metric, when logged.
        loss: The training loss (second axis), when logged.
        peak_step: The marked peak (the latest logged ``ctx_reliance/peak_step``, unless given), or ``None``.
        stop_step: The marked early stop, or ``None``.
        on_axis: Whether the monitored metric is on the 0-1 axis (``logprob_margin`` and ``context_lift`` are nats).
    """

    monitor_key: str
    curves: tuple[Series, ...]
    band: tuple[tuple[float, float, float], ...]
    smoothed: Series | None
    loss: Series | None
    peak_step: float | None
    stop_step: int | None
    on_axis: bool

    @property
    def steps(self) -> list[int]:
        """Every step with a point on a reliance curve, ascending."""
        return sorted({int(step) for curve in self.curves for step in curve.steps})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary: the monitor, the reliance steps, the peak and stop markers, the curves' keys and
        the first and last training-loss steps."""
        loss_steps = self.loss.steps if self.loss is not None else []
        return {
            "monitor": self.monitor_key,
            "steps": self.steps,
            "peak_step": None if self.peak_step is None else int(self.peak_step),
            "stop_step": self.stop_step,
            "curves": [curve.key for curve in self.curves],
            "loss_steps": [int(loss_steps[0]), int(loss_steps[-1])] if loss_steps else [],
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_data(
    log_history: Sequence[dict[str, Any]],
    *,
    monitor_key: str = f"{METRIC_PREFIX}/counterfactual_accuracy",
    stop_step: int | None = None,
    peak_step: float | None = None,
) -> PlotData:
    """What :func:`plot_reliance` draws from ``log_history``-style rows (see there).

    Args:
        log_history: ``trainer_state.json``'s ``log_history``, a run summary's ``history`` or rows in that shape.
        monitor_key: The monitored metric's key.
        stop_step: Step at which training was stopped early, marked when given.
        peak_step: The peak to mark; ``None``: the latest ``ctx_reliance/peak_step`` logged.

    Returns:
        The :class:`PlotData`.
    """
    rows = [r for r in log_history if isinstance(r, dict) and _ANCHOR in r and "step" in r]
    drawn = plot_curves()
    curve_keys = [f"{METRIC_PREFIX}/{metric}" for metric, _ in drawn]
    curves = []
    for (_, label), key in zip(drawn, curve_keys):
        points = tuple((r["step"], r[key]) for r in rows if key in r)
        if points:
            curves.append(Series(key, label, points))
    on_axis = not monitor_key.endswith(("logprob_margin", "context_lift"))  # nats: off this [0, 1] axis
    if on_axis and monitor_key not in curve_keys:  # the monitored metric is not among the curves: draw it too
        points = tuple((r["step"], r[monitor_key]) for r in rows if monitor_key in r)
        if points:
            curves.append(Series(monitor_key, f"{monitor_key.split('/', 1)[-1]} (monitored)", points))
    low, high = monitor_key + "_ci_low", monitor_key + "_ci_high"
    band = tuple((r["step"], r[low], r[high]) for r in rows if low in r and high in r) if on_axis else ()
    smoothed_points = tuple((r["step"], r[_SMOOTHED]) for r in rows if _SMOOTHED in r)
    smoothed = Series(_SMOOTHED, f"{monitor_key.split('/')[-1]} (smoothed)", smoothed_points) \
        if smoothed_points else None
    if peak_step is None:
        peaks = [r.get(_PEAK_STEP) for r in rows]
        peak_step = next((p for p in reversed(peaks) if _is_number(p)), None)
    loss_points = tuple((r["step"], r["loss"]) for r in log_history
                        if isinstance(r, dict) and "loss" in r and "step" in r)
    loss = Series("loss", "training loss", loss_points) if loss_points else None
    return PlotData(monitor_key=monitor_key, curves=tuple(curves), band=band, smoothed=smoothed, loss=loss,
                    peak_step=peak_step, stop_step=stop_step, on_axis=on_axis)


def plot_reliance(
    log_history: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    monitor_key: str = f"{METRIC_PREFIX}/counterfactual_accuracy",
    stop_step: int | None = None,
    peak_step: float | None = None,
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
    family's metric) is drawn as well. What is drawn is :func:`plot_data`'s result; its :meth:`PlotData.to_json` is
    stored in the PNG as the text chunk :data:`PNG_METADATA_KEY`.

    Args:
        log_history: ``trainer_state.json``'s ``log_history`` (or rows in its shape, e.g. from scan results or a run
            summary's ``history``).
        path: The PNG to write.
        monitor_key: The monitored metric's key; labels the smoothed curve.
        stop_step: Step at which training was stopped early, marked when given.
        peak_step: The peak to mark; ``None``: the latest ``ctx_reliance/peak_step`` of the rows.
        title: The figure's title.
        size: Figure width and height in inches.
        dpi: Dots per inch (PNG pixels = inches x dpi).

    Returns:
        The path written.
    """
    data = plot_data(log_history, monitor_key=monitor_key, stop_step=stop_step, peak_step=peak_step)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    curve_keys = [f"{METRIC_PREFIX}/{metric}" for metric, _ in plot_curves()]
    color = f"C{curve_keys.index(monitor_key)}" if monitor_key in curve_keys else f"C{len(curve_keys) + 1}"
    for curve in data.curves:
        if curve.key in curve_keys:
            ax.plot(*zip(*curve.points), marker="o", markersize=3, label=curve.label)
        else:  # the monitored metric, drawn in its band's colour
            ax.plot(*zip(*curve.points), marker="s", markersize=3, color=color, label=curve.label)
    if data.band:
        steps, low, high = zip(*data.band)
        ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0,
                        label=f"{monitor_key.split('/')[-1]} 95% interval")
    if data.smoothed is not None:
        ax.plot(*zip(*data.smoothed.points), linestyle="--", color="gray", label=data.smoothed.label)
    if data.peak_step is not None:
        ax.axvline(data.peak_step, color="green", linestyle=":", label=f"peak (step {int(data.peak_step)})")
    if data.stop_step is not None:
        ax.axvline(data.stop_step, color="red", linestyle=":", label=f"stop (step {data.stop_step})")
    ax.set_xlabel("global step")
    ax.set_ylabel("accuracy" if monitor_key in curve_keys or not data.on_axis else "accuracy / probability")
    ax.set_ylim(-0.02, 1.02)
    if data.loss is not None:
        ax2 = ax.twinx()
        ax2.plot(*zip(*data.loss.points), color="black", alpha=0.3, linewidth=1, label=data.loss.label)
        ax2.set_ylabel("training loss")
        lines, labels = ax.get_legend_handles_labels()
        lines2, labels2 = ax2.get_legend_handles_labels()
        ax.legend(lines + lines2, labels + labels2, fontsize=7, loc="lower left")
    else:
        ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title)
    fig.tight_layout()
    png = os.fspath(path).lower().endswith(".png")  # other formats take other metadata keys
    fig.savefig(path, metadata={PNG_METADATA_KEY: json.dumps(data.to_json())} if png else None)
    plt.close(fig)
    return os.fspath(path)
