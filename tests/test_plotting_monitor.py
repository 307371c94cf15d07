"""plot_reliance draws the monitored metric when it is not one of the accuracy curves (the default monitor,
counterfactual_probability), in the colour of its interval band."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.axes  # noqa: E402

from ctx_callback.plotting import plot_reliance  # noqa: E402

P = "ctx_reliance/counterfactual_probability"
A = "ctx_reliance/counterfactual_accuracy"


def _history():
    rows = []
    for step, acc, prob in ((0, 0.8, 0.75), (10, 0.9, 0.85), (20, 0.7, 0.6)):
        rows.append({"step": step, A: acc, "ctx_reliance/parametric_accuracy": 1 - acc, P: prob,
                     P + "_ci_low": prob - 0.05, P + "_ci_high": prob + 0.05, "ctx_reliance/monitor_smoothed": prob,
                     "ctx_reliance/peak_step": 10.0})
    return rows


def _drawn(monkeypatch, tmp_path, monitor_key):
    lines, fills = [], []
    plot, fill = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.fill_between

    def record_plot(self, *args, **kwargs):
        lines.append((kwargs.get("label"), kwargs.get("color"), list(args[1]) if len(args) > 1 else None))
        return plot(self, *args, **kwargs)

    def record_fill(self, *args, **kwargs):
        fills.append(kwargs.get("color"))
        return fill(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record_plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", record_fill)
    plot_reliance(_history(), tmp_path / "p.png", monitor_key=monitor_key)
    return lines, fills


def test_the_monitored_probability_is_drawn_with_its_band(monkeypatch, tmp_path):
    lines, fills = _drawn(monkeypatch, tmp_path, P)
    monitored = [line for line in lines if line[0] == "counterfactual_probability (monitored)"]
    assert len(monitored) == 1 and monitored[0][2] == [0.75, 0.85, 0.6]
    assert fills == [monitored[0][1]]  # the band has the monitored curve's colour


def test_an_accuracy_monitor_is_not_drawn_twice(monkeypatch, tmp_path):
    lines, fills = _drawn(monkeypatch, tmp_path, A)
    assert not any(label and "(monitored)" in label for label, _, _ in lines)
    assert fills == []  # this history has no interval of the accuracy


def test_the_png_records_what_was_drawn(tmp_path):
    """plot_data is what plot_reliance draws; its summary is stored in the PNG (the peak can be given explicitly)."""
    import json

    from PIL import Image

    from ctx_callback.plotting import PNG_METADATA_KEY, plot_data

    history = _history() + [{"step": 5, "loss": 2.0}, {"step": 15, "loss": 1.5}]
    data = plot_data(history, monitor_key=P, stop_step=20, peak_step=0)
    assert [c.key for c in data.curves] == [A, "ctx_reliance/parametric_accuracy", P]
    assert [step for step, _, _ in data.band] == [0, 10, 20]
    assert (data.peak_step, data.stop_step) == (0, 20)
    assert plot_data(history, monitor_key=P).peak_step == 10.0  # the logged peak when none is given
    plot_reliance(history, tmp_path / "p.png", monitor_key=P, stop_step=20, peak_step=0)
    with Image.open(tmp_path / "p.png") as image:
        stored = json.loads(image.text[PNG_METADATA_KEY])
    assert stored == data.to_json()
    assert stored["steps"] == [0, 10, 20] and stored["loss_steps"] == [5, 15] and stored["peak_step"] == 0
