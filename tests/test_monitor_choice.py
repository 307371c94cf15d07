"""The pure parts of benchmarks/monitor_choice.py: metrics rebuilt from per-probe margins, the fall event."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mc():
    spec = importlib.util.spec_from_file_location("monitor_choice", ROOT / "benchmarks" / "monitor_choice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fall_event_is_the_first_event_with_half_the_eventual_decline(mc):
    assert mc.fall_event(np.array([0.5, 0.9, 0.85, 0.6, 0.5])) == 3  # peak 0.9, decline 0.4: 0.7 or lower
    assert mc.fall_event(np.array([0.5, 0.9, 0.5])) == 2
    assert mc.fall_event(np.array([0.5, 0.6, 0.7])) is None  # no decline after the maximum


def test_metrics_from_margins_match_the_callbacks_definitions_and_unions_weight_by_probes(mc, tmp_path):
    probes = [{"id": f"a{i}", "family": "world_facts"} for i in range(3)]
    probes += [{"id": f"b{i}", "family": "quotes"} for i in range(1)]
    margins = {"0": [2.0, -1.0, 0.5, 3.0], "10": [1.0, 1.0, -0.5, -3.0]}
    path = tmp_path / "monitor_margins.json"
    path.write_text(json.dumps({"probes": probes, "steps": margins}))
    rows = mc._margin_rows(path)
    wf = rows[0]
    assert wf["ctx_reliance/world_facts/counterfactual_accuracy"] == pytest.approx(2 / 3)
    assert wf["ctx_reliance/world_facts/logprob_margin"] == pytest.approx(0.5)
    sigmoid = [1 / (1 + math.exp(-m)) for m in (2.0, -1.0, 0.5)]
    assert wf["ctx_reliance/world_facts/counterfactual_probability"] == pytest.approx(np.mean(sigmoid))
    # the union over families is the mean over all their probes
    assert mc._union(rows[10], ("world_facts", "quotes"), "counterfactual_accuracy") == pytest.approx(2 / 4)
    assert mc._union(rows[10], ("world_facts", "quotes"), "logprob_margin") == pytest.approx(-1.5 / 4)


def test_logged_candidates_are_read_from_the_runs_summary_at_every_step(mc, tmp_path):
    history = [{"step": s, "ctx_reliance/attention/context_share": v, "ctx_reliance/utilisation": v / 2}
               for s, v in ((0, 0.2), (10, 0.25), (20, 0.21))]
    del history[1]["ctx_reliance/utilisation"]  # a round that did not score the controls: not a candidate
    (tmp_path / "ctx_reliance_summary.json").write_text(json.dumps({"summary": {}, "history": history}))
    series = mc._logged_series(tmp_path, [0, 10, 20])
    assert list(series) == ["logged: attention/context_share"]
    np.testing.assert_allclose(series["logged: attention/context_share"], [0.2, 0.25, 0.21])
    assert mc._logged_series(tmp_path / "missing", [0]) == {}
