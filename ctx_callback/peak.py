"""Peak tracking and the early-stopping decision: a small pure unit (no torch, no transformers).

Each probe event feeds one value of the monitored metric. The tracker smooths it (EMA or moving average over
probe events), keeps the best smoothed value and its step, and counts the events since that best. A new best
needs to beat the old one by more than ``min_delta``. Stopping is advised once ``patience`` events passed without
improvement, but never before ``warmup_steps``.

NaN (a failed or diverged probe) is never an improvement; it neither enters the smoothing nor counts towards
``patience``, so a run of broken probe rounds cannot trigger a stop on its own.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .errors import ConfigurationError

__all__ = ["PeakDecision", "PeakTracker", "check_peak_options"]

_SMOOTHING = ("ema", "mean", "none")
_MODES = ("max", "min")


def check_peak_options(mode: str = "max", smoothing: str = "ema", ema_alpha: float = 0.5, window: int = 3,
                       min_delta: float = 0.0, patience: int | None = None, warmup_steps: int = 0) -> None:
    """Validate the options of :class:`PeakTracker` (the stop rules share them) without building one.

    Raises:
        ConfigurationError: A bad value, naming the argument, the value and what is allowed.
    """
    if mode not in _MODES:
        raise ConfigurationError(f"mode must be one of {list(_MODES)}, got {mode!r}.")
    if smoothing not in _SMOOTHING:
        raise ConfigurationError(f"smoothing must be one of {list(_SMOOTHING)}, got {smoothing!r}.")
    if not (0.0 < ema_alpha <= 1.0):
        raise ConfigurationError(f"ema_alpha must be in (0, 1], got {ema_alpha!r}.")
    if not isinstance(window, int) or window < 1:
        raise ConfigurationError(f"window must be an integer >= 1, got {window!r}.")
    if not (isinstance(min_delta, (int, float)) and min_delta >= 0 and math.isfinite(min_delta)):
        raise ConfigurationError(f"min_delta must be a finite number >= 0, got {min_delta!r}.")
    if patience is not None and (not isinstance(patience, int) or isinstance(patience, bool) or patience < 1):
        raise ConfigurationError(f"patience must be an integer >= 1 (or None to never stop), got {patience!r}.")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigurationError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")


@dataclass(frozen=True)
class PeakDecision:
    """What the tracker concluded from one probe event."""

    step: int
    value: float
    smoothed: float
    is_new_peak: bool
    should_stop: bool
    peak_step: int | None
    peak_value: float
    events_since_peak: int
    reason: str | None = None


class PeakTracker:
    """Track the peak of a noisy metric over probe events and decide when it has declined for good.

    Args:
        mode: ``"max"`` (the default: reliance should be high) or ``"min"``.
        smoothing: ``"ema"`` (exponential moving average), ``"mean"`` (moving average of the last
            ``window`` events) or ``"none"``.
        ema_alpha: Weight of the newest value in the EMA, in (0, 1].
        window: Number of events in the moving average.
        min_delta: Smallest improvement of the smoothed value that counts as a new peak (>= 0).
        patience: Events without improvement before stopping is advised; ``None`` never advises stopping.
        warmup_steps: No stop is advised before this global step (peaks are still tracked).
    """

    def __init__(
        self,
        mode: str = "max",
        smoothing: str = "ema",
        ema_alpha: float = 0.5,
        window: int = 3,
        min_delta: float = 0.0,
        patience: int | None = 3,
        warmup_steps: int = 0,
    ) -> None:
        check_peak_options(mode, smoothing, ema_alpha, window, min_delta, patience, warmup_steps)
        self.mode = mode
        self.smoothing = smoothing
        self.ema_alpha = float(ema_alpha)
        self.window = window
        self.min_delta = float(min_delta)
        self.patience = patience
        self.warmup_steps = warmup_steps
        self.reset()

    def reset(self) -> None:
        """Forget every event (a fresh run, or before replaying logged events on resume)."""
        self.smoothed: float = math.nan
        self.recent: deque[float] = deque(maxlen=self.window)
        self.peak_value: float = math.nan
        self.peak_step: int | None = None
        self.events_since_peak: int = 0
        self.num_events: int = 0

    def _smooth(self, value: float) -> float:
        if math.isnan(value):
            return self.smoothed
        if self.smoothing == "none":
            return value
        if self.smoothing == "mean":
            self.recent.append(value)
            return sum(self.recent) / len(self.recent)
        if math.isnan(self.smoothed):
            return value
        return self.ema_alpha * value + (1.0 - self.ema_alpha) * self.smoothed

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if math.isnan(self.peak_value):
            return True
        if self.mode == "max":
            return value > self.peak_value + self.min_delta
        return value < self.peak_value - self.min_delta

    def update(self, step: int, value: float) -> PeakDecision:
        """Feed the monitored value measured at global ``step``."""
        value = float(value)
        self.num_events += 1
        if math.isnan(value):
            return PeakDecision(
                step=int(step), value=value, smoothed=self.smoothed, is_new_peak=False, should_stop=False,
                peak_step=self.peak_step, peak_value=self.peak_value, events_since_peak=self.events_since_peak,
            )
        self.smoothed = self._smooth(value)
        new_peak = self._improves(self.smoothed)
        if new_peak:
            self.peak_value = self.smoothed
            self.peak_step = int(step)
            self.events_since_peak = 0
        else:
            self.events_since_peak += 1
        should_stop = (
            self.patience is not None
            and self.events_since_peak >= self.patience
            and step >= self.warmup_steps
        )
        reason = None
        if should_stop:
            reason = (
                f"no improvement of the smoothed metric by more than {self.min_delta} for {self.events_since_peak} "
                f"probe events: peak {self.peak_value:.4f} at step {self.peak_step}, now {self.smoothed:.4f} "
                f"(raw {value:.4f}) at step {step}"
            )
        return PeakDecision(
            step=int(step), value=value, smoothed=self.smoothed, is_new_peak=new_peak, should_stop=should_stop,
            peak_step=self.peak_step, peak_value=self.peak_value, events_since_peak=self.events_since_peak,
            reason=reason,
        )
