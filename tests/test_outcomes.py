"""Per-probe outcomes (ctx_callback.outcomes): they are the logged metrics, the probe log, flips; the derived-key
table of docs/metrics.md equals ctx_callback.metrics.DERIVED_KEYS."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ctx_callback.metrics import METRICS, compute_metrics, derived_glossary_markdown
from ctx_callback.outcomes import (
    PER_PROBE_METRICS,
    ProbeLog,
    compute_flips,
    metric_outcomes,
    preferred_vector,
    probe_rows,
    read_probe_rows,
)

#: The documentation page that holds the derived-key table (it moved there from the README).
METRICS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
ALL = ("context", "closed_book", "aligned", "irrelevant")


@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_the_mean_of_the_outcomes_is_the_logged_metric(mode):
    rng = np.random.default_rng(3)
    n = 40
    if mode == "loglik":
        scores = rng.normal(-5, 3, size=(n, len(ALL), 2))
    else:
        scores = rng.integers(0, 2, size=(n, len(ALL), 2)).astype(float)
    scores[3, 2, :] = np.nan  # a probe without an aligned context
    metrics = compute_metrics(scores, ["f"] * n, ALL, mode=mode, per_family=False)
    checked = 0
    for spec in METRICS:
        key = f"ctx_reliance/{spec.name}"
        outcomes = metric_outcomes(scores, ALL, mode, spec.name)
        if outcomes is None:
            assert spec.name not in PER_PROBE_METRICS or key not in metrics or mode not in spec.modes
            continue
        assert key in metrics, spec.name
        assert np.nanmean(np.asarray(outcomes, dtype=float)) == pytest.approx(metrics[key], abs=1e-12), spec.name
        binary = PER_PROBE_METRICS[spec.name]
        assert set(np.unique(np.asarray(outcomes, float)[~np.isnan(np.asarray(outcomes, float))])) <= {0.0, 1.0} \
            or not binary
        checked += 1
    # loglik: 4 accuracies, probability, margin, lift, robustness, utilisation, ambiguity; generate: 4 accuracies,
    # both, neither, robustness, utilisation.
    assert checked == (10 if mode == "loglik" else 8)
    # Complete binary outcomes are bool; with an unscored probe they are 0/1/NaN floats.
    assert metric_outcomes(scores, ALL, mode, "counterfactual_accuracy").dtype == bool
    assert metric_outcomes(scores, ALL, mode, "aligned_accuracy").dtype == np.float64
    assert metric_outcomes(scores, ("context",), mode, "closed_book_accuracy") is None
    assert metric_outcomes(scores, ALL, mode, "memorization_ratio") is None


def test_preferred_answers_and_probe_rows():
    scores = np.array([[[-1.0, -2.0], [-3.0, -1.0]], [[-4.0, -2.0], [-1.0, -3.0]], [[-2.0, -2.0], [np.nan, np.nan]]])
    variants = ("context", "closed_book")
    assert preferred_vector(scores, variants, "loglik") == ["context", "memory", "tie"]
    rows = probe_rows(10, ["a", "b", "c"], ["f", "f", "g"], scores, variants, "loglik")
    assert rows[0] == {"step": 10, "id": "a", "family": "f", "cf": -1.0, "par": -2.0, "preferred": "context",
                       "known": True}
    assert rows[1]["known"] is False and "known" not in rows[2]
    gen = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]], [[0.0, 0.0]]])
    rows = probe_rows(5, list("wxyz"), ["f"] * 4, gen, ("context",), "generate",
                      generations=[["Lyon"], ["Paris"], ["Lyon or Paris"], ["?"]])
    assert [r["preferred"] for r in rows] == ["context", "memory", "both", "neither"]
    assert rows[0]["cf"] == 1 and rows[0]["generation"] == "Lyon"


def test_probe_log_appends_and_truncates_for_resume(tmp_path):
    log = ProbeLog(tmp_path / "sub" / "ctx_reliance_probes.jsonl")
    for step in (0, 2, 4, 6):
        log.append([{"step": step, "id": p, "preferred": "context"} for p in "ab"])
    with open(log.path, "a") as f:
        f.write('{"step": 8, "id": "a", "pref')  # a process killed mid-line
    assert len(read_probe_rows(log.path)) == 8
    assert log.truncate_after(4) == 3  # the 2 rows of step 6 and the partial line
    assert [r["step"] for r in read_probe_rows(log.path)] == [0, 0, 2, 2, 4, 4]
    assert log.truncate_after(4) == 0
    assert log.truncate_after(None) == 6 and read_probe_rows(log.path) == []


def test_flips_between_two_events_with_closed_book_knowledge():
    rows = [
        {"step": 0, "id": "w/1", "family": "w", "preferred": "context", "known": True},
        {"step": 0, "id": "w/2", "family": "w", "preferred": "memory", "known": False},
        {"step": 0, "id": "b/3", "family": "b", "preferred": "context"},
        {"step": 10, "id": "w/1", "family": "w", "preferred": "memory"},
        {"step": 10, "id": "w/2", "family": "w", "preferred": "context", "known": True},
        {"step": 10, "id": "b/3", "family": "b", "preferred": "context"},
    ]
    report = compute_flips(rows, 0, 10)
    assert [f.id for f in report.by_direction("to_memory")] == ["w/1"]
    assert [f.id for f in report.by_direction("to_context")] == ["w/2"]
    assert report.by_direction("to_memory")[0].known is True  # the latest check up to step 10
    assert report.by_direction("to_context")[0].known is True
    out = report.to_json()
    assert out["to_memory"] == 1 and out["to_context"] == 1 and out["num_probes"] == 3
    assert out["families"] == {"w": {"to_memory": 1, "to_context": 1, "other": 0}}
    with pytest.raises(KeyError, match=r"no probe event at step 5 in the log; logged steps: \[0, 10\]"):
        compute_flips(rows, 5, 10)


def test_readme_derived_keys_table_equals_the_source():
    text = METRICS_PAGE.read_text(encoding="utf-8")
    match = re.search(r"<!-- derived-keys:start -->\n(.*?)\n<!-- derived-keys:end -->", text, re.DOTALL)
    assert match, "docs/metrics.md lost its derived-keys markers"
    assert match.group(1) == derived_glossary_markdown(), (
        "docs/metrics.md derived-key table is out of date: paste ctx_callback.metrics.derived_glossary_markdown()")


def test_probability_intervals_stay_within_zero_and_one():
    from ctx_callback.outcomes import uncertainty

    scores = np.zeros((30, 1, 2))
    scores[:, 0, 0] = 12.0  # every probe near p_cf = 1, one far below: the t interval would pass 1
    scores[0, 0, 0] = -3.0
    out = uncertainty(scores, ["f"] * 30, ("context",), "loglik",
                      [("ctx_reliance/counterfactual_probability", "counterfactual_probability", None),
                       ("ctx_reliance/logprob_margin", "logprob_margin", None)])
    assert out["ctx_reliance/counterfactual_probability_ci_high"] == 1.0
    assert 0.0 < out["ctx_reliance/counterfactual_probability_ci_low"] < 1.0
    assert out["ctx_reliance/logprob_margin_ci_high"] > 1.0  # margins are not bounded: not clipped


def test_the_probe_log_module_holds_the_file_and_the_flips_and_outcomes_reexports_them(tmp_path):
    from ctx_callback import outcomes, probe_log

    for name in ("PROBES_FILE", "SUMMARY_FILE", "Flip", "FlipReport", "ProbeLog", "compute_flips", "event_steps",
                 "read_probe_rows"):
        assert getattr(outcomes, name) is getattr(probe_log, name), name
    log = probe_log.ProbeLog(tmp_path / probe_log.PROBES_FILE)
    log.append(probe_rows(0, ["a"], ["f"], np.array([[[-1.0, -2.0]]]), ("context",), "loglik"))
    log.append(probe_rows(2, ["a"], ["f"], np.array([[[-3.0, -2.0]]]), ("context",), "loglik"))
    rows = probe_log.read_probe_rows(log.path)
    assert probe_log.event_steps(rows) == [0, 2]
    assert [f.direction for f in probe_log.compute_flips(rows, 0, 2).flips] == ["to_memory"]
