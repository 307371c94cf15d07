"""The metric table is the single source: computation, monitor validation, direction and the README glossary."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from ctx_callback import metrics
from ctx_callback.errors import ConfigurationError
from ctx_callback.metrics import METRICS, MODES, MetricSpec, compute_metrics, glossary_markdown, metric_spec
from ctx_callback.monitor import parse_monitor

#: The documentation page that holds the glossary (it moved there from the README).
METRICS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
ALL = ("context", "closed_book", "aligned", "irrelevant")


def test_readme_glossary_equals_the_table():
    text = METRICS_PAGE.read_text(encoding="utf-8")
    match = re.search(r"<!-- glossary:start -->\n(.*?)\n<!-- glossary:end -->", text, re.DOTALL)
    assert match, "docs/metrics.md lost its glossary markers"
    assert match.group(1) == glossary_markdown(), (
        "docs/metrics.md glossary is out of date: paste ctx_callback.metrics.glossary_markdown() between the markers")


def test_table_is_well_formed():
    names = [s.name for s in METRICS]
    shorts = [s.short for s in METRICS]
    assert len(set(names)) == len(names) and len(set(shorts)) == len(shorts)
    for spec in METRICS:
        assert re.fullmatch(r"[a-z_]+", spec.name)
        assert 0 < len(spec.short) <= 7
        assert spec.modes and set(spec.modes) <= set(MODES)
        assert set(spec.required_variants) <= {"closed_book", "aligned", "irrelevant"}
        assert spec.description and "\n" not in spec.description
        assert spec.key == f"ctx_reliance/{spec.name}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variants", [("context",), ("context", "closed_book"), ALL])
def test_compute_emits_exactly_the_table_entries_that_exist(mode, variants):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, len(variants), 2)) if mode == "loglik" else rng.integers(0, 2, (6, len(variants), 2))
    out = compute_metrics(scores, ["a"] * 3 + ["b"] * 3, variants, mode=mode)
    expected = [s.name for s in METRICS if mode in s.modes and set(s.required_variants) <= set(variants)]
    assert [k.split("/")[-1] for k in out if k.count("/") == 1] == expected
    assert {k.split("/")[-1] for k in out if k.startswith("ctx_reliance/a/")} == set(expected)
    for name in expected:  # everything emitted is also a valid monitor, with the table's direction
        spec = metric_spec(name)
        if spec.monitorable:
            assert parse_monitor(name, mode, variants).greater_is_better is spec.greater_is_better


def test_every_metric_survives_an_all_nan_group():
    scores = np.full((2, len(ALL), 2), np.nan)
    for mode in MODES:
        out = compute_metrics(scores, ["x", "x"], ALL, mode=mode)
        assert out["ctx_reliance/num_probes"] == 2.0
        assert all(np.isnan(v) for k, v in out.items() if not k.endswith("num_probes"))


def test_a_new_spec_is_computed_and_monitorable(monkeypatch):
    """What 'one edit' means: append a MetricSpec and the computation and the monitor pick it up."""
    spec = MetricSpec("cf_hit_rate_x2", "twice the counterfactual accuracy (test only)", short="x2",
                      modes=("loglik",), compute=lambda t: 2 * float(np.mean(t.counterfactual() > t.parametric())))
    monkeypatch.setattr(metrics, "METRICS", (*METRICS, spec))
    scores = np.array([[[-1.0, -2.0]], [[-3.0, -2.0]]])
    out = compute_metrics(scores, ["f", "f"], ["context"])
    assert out["ctx_reliance/cf_hit_rate_x2"] == 1.0
    assert parse_monitor("f/cf_hit_rate_x2", "loglik", ["context"]).key == "ctx_reliance/f/cf_hit_rate_x2"
    assert "`cf_hit_rate_x2`" in metrics.glossary_markdown()


def test_unknown_metric_and_mode():
    with pytest.raises(ConfigurationError, match="unknown metric 'accuracy'"):
        metric_spec("accuracy")
    with pytest.raises(ConfigurationError, match="mode must be one of"):
        compute_metrics(np.zeros((1, 1, 2)), ["a"], ["context"], mode="sample")


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        METRICS[0].short = "zz"  # type: ignore[misc]
