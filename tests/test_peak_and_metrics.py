"""The pure units: peak tracking / early-stopping decisions and metric computation (no torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctx_callback import PeakTracker, compute_metrics


def feed(tracker, values, start=0, every=10):
    return [tracker.update(start + i * every, v) for i, v in enumerate(values)]


def test_rise_then_fall_stops_after_patience():
    t = PeakTracker(smoothing="none", patience=2)
    d = feed(t, [0.5, 0.7, 0.9, 0.8, 0.85, 0.6])
    assert [x.is_new_peak for x in d] == [True, True, True, False, False, False]
    assert [x.should_stop for x in d] == [False, False, False, False, True, True]
    assert d[4].peak_step == 20 and d[4].peak_value == 0.9
    assert "peak 0.9000 at step 20" in d[4].reason


def test_min_delta_requires_a_real_improvement():
    t = PeakTracker(smoothing="none", patience=2, min_delta=0.05)
    d = feed(t, [0.5, 0.54, 0.56])
    assert [x.is_new_peak for x in d] == [True, False, True]


def test_ema_smoothing_ignores_a_single_dip():
    t = PeakTracker(smoothing="ema", ema_alpha=0.5, patience=3)
    d = feed(t, [0.8, 0.9, 0.5, 1.0, 1.0])
    assert [x.smoothed for x in d] == pytest.approx([0.8, 0.85, 0.675, 0.8375, 0.91875])
    assert not any(x.should_stop for x in d)
    assert d[-1].is_new_peak


def test_moving_average():
    t = PeakTracker(smoothing="mean", window=2, patience=5)
    d = feed(t, [1.0, 0.0, 0.5])
    assert [x.smoothed for x in d] == [1.0, 0.5, 0.25]


def test_nan_is_never_an_improvement_and_does_not_count():
    t = PeakTracker(smoothing="none", patience=1)
    d = feed(t, [math.nan, 0.3, math.nan, math.nan, 0.2])
    assert [x.is_new_peak for x in d] == [False, True, False, False, False]
    assert [x.should_stop for x in d] == [False, False, False, False, True]
    assert t.peak_value == 0.3


def test_warmup_delays_stopping_but_not_peaks():
    t = PeakTracker(smoothing="none", patience=1, warmup_steps=35)
    d = feed(t, [0.9, 0.5, 0.4, 0.3, 0.2])  # steps 0..40
    assert [x.should_stop for x in d] == [False, False, False, False, True]
    assert t.peak_step == 0


def test_min_mode():
    t = PeakTracker(mode="min", smoothing="none", patience=1)
    d = feed(t, [0.5, 0.3, 0.4])
    assert [x.is_new_peak for x in d] == [True, True, False] and d[-1].should_stop


@pytest.mark.parametrize("kwargs, match", [
    ({"patience": 0}, "patience must be an integer >= 1"),
    ({"smoothing": "median"}, "smoothing must be one of"),
    ({"ema_alpha": 0.0}, "ema_alpha"),
    ({"min_delta": -1}, "min_delta"),
    ({"mode": "up"}, "mode must be"),
    ({"warmup_steps": -5}, "warmup_steps"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PeakTracker(**kwargs)


def test_loglik_metrics_by_hand():
    # rows: probe; cols: context, closed_book, aligned; last: (cf, par) log-probs
    scores = np.array([
        [[-1.0, -3.0], [-5.0, -1.0], [-4.0, -0.5]],   # follows context, knows fact, aligned ok
        [[-4.0, -2.0], [-6.0, -1.0], [-3.0, -1.0]],   # answers from memory
        [[-2.0, -2.5], [-1.0, -2.0], [np.nan, np.nan]],  # follows context, does not know, no aligned row
    ])
    m = compute_metrics(scores, ["a", "a", "b"], ["context", "closed_book", "aligned"])
    assert m["ctx_reliance/counterfactual_accuracy"] == pytest.approx(2 / 3)
    assert m["ctx_reliance/parametric_accuracy"] == pytest.approx(1 / 3)
    assert m["ctx_reliance/closed_book_accuracy"] == pytest.approx(2 / 3)
    assert m["ctx_reliance/aligned_accuracy"] == pytest.approx(1.0)  # NaN row excluded
    assert m["ctx_reliance/logprob_margin"] == pytest.approx((2 - 2 + 0.5) / 3)
    assert m["ctx_reliance/context_lift"] == pytest.approx(((-1 + 5) + (-4 + 6) + (-2 + 1)) / 3)
    def sig(x):
        return 1 / (1 + math.exp(-x))

    assert m["ctx_reliance/counterfactual_probability"] == pytest.approx((sig(2) + sig(-2) + sig(0.5)) / 3)
    assert m["ctx_reliance/a/counterfactual_accuracy"] == 0.5
    assert m["ctx_reliance/b/num_probes"] == 1.0
    assert all(type(v) is float for v in m.values())


def test_generation_metrics_by_hand():
    hits = np.array([[[1, 0]], [[0, 1]], [[1, 1]], [[0, 0]]], dtype=float)
    m = compute_metrics(hits, ["f"] * 4, ["context"], mode="generate", per_family=False)
    assert m["ctx_reliance/counterfactual_accuracy"] == 0.5
    assert m["ctx_reliance/both_rate"] == 0.25 and m["ctx_reliance/neither_rate"] == 0.25
    assert m["ctx_reliance/memorization_ratio"] == 0.5
    assert "ctx_reliance/f/both_rate" not in m


def test_metrics_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.zeros((2, 2)), ["a", "b"], ["context"])
