"""Every metric is defined once, per probe (issue 19): the spec, the registry and its live views, the logged values
equal to the last bit to the computation before the redesign, and a metric registered in one place reaching every
consumer of a real training run (logged row, intervals, paired test, probe log, ``scan``, glossary)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from ctx_callback import ProbeScorer, probes_from_records
from ctx_callback.errors import ConfigurationError
from ctx_callback.metric_spec import CONTINUOUS, HIT, MeanOverProbes, MetricRegistry, MetricSpec
from ctx_callback.metrics import (
    INTERVAL_METRICS,
    METRICS,
    PARAMETRIC_METRICS,
    compute_metrics,
    glossary_markdown,
    metric_key,
    register_metric,
    unregister_metric,
)
from ctx_callback.monitor import NEEDS_PARAMETRIC
from ctx_callback.outcomes import PER_PROBE_METRICS, metric_outcomes, uncertainty
from ctx_callback.score_table import ScoreTable, better
from tests.helpers import PROBES, capital_records, make_tiny_llama, make_trainer
from tests.test_multiple_choice import mixed_probes

ALL = ("context", "closed_book", "aligned")


def _spec(name: str = "test_only_rate", **fields) -> MetricSpec:
    fields = {"short": "tonly", "modes": ("loglik",), "per_probe": lambda t: better(t.counterfactual(), t.rival()),
              "outcome": HIT, **fields}
    return MetricSpec(name, "a metric for a test", **fields)


# -- the spec and the registry --------------------------------------------------------------------------------------


def test_the_aggregate_is_the_mean_of_the_per_probe_values():
    table = ScoreTable(np.array([[[-1.0, -2.0]], [[-3.0, -2.0]], [[np.nan, -1.0]]]), {"context": 0})
    spec = _spec()
    assert spec.compute == MeanOverProbes(spec.per_probe)  # derived, not written twice
    assert spec.compute(table) == 0.5 and spec.is_hit
    np.testing.assert_array_equal(spec.outcomes(table), [1.0, 0.0, np.nan])
    assert _spec(modes=("generate",)).outcomes(table) is None  # not a metric of the table's mode
    assert _spec(requires="aligned").outcomes(table) is None  # its variant was not scored
    assert np.isnan(spec.compute(ScoreTable(np.full((2, 1, 2), np.nan), {"context": 0})))


@pytest.mark.parametrize(("fields", "match"), [
    ({"per_probe": None}, "needs per_probe"),
    ({"outcome": None}, "outcome must be one of"),
    ({"outcome": "binary"}, "outcome must be one of"),
    ({"bounds": (0.0, 1.0)}, "bounds clip the t interval of a continuous metric"),
    ({"per_probe": None, "compute": lambda t: 0.0, "interval": True}, "describe per-probe values"),
])
def test_a_malformed_spec_says_what_to_give(fields, match):
    with pytest.raises(ConfigurationError, match=match):
        _spec(**fields)


@pytest.mark.parametrize(("spec", "match"), [
    (_spec("Bad-Name"), "lower-case letters"),
    (_spec(short="toolong!"), "1 to 7 characters"),
    (_spec(modes=("sample",)), "modes must be"),
    (_spec(requires="paraphrase"), "requires must be None or one of"),
    (_spec("counterfactual_accuracy"), "registered already"),
    (_spec(short="cf"), "taken by 'counterfactual_accuracy'"),
])
def test_register_refuses_what_would_break_a_table_or_a_key(spec, match):
    registry = MetricRegistry(METRICS)
    with pytest.raises(ConfigurationError, match=match):
        registry.register(spec)
    assert list(registry) == list(METRICS)


def test_registry_is_a_read_only_sequence_with_register_and_unregister():
    registry = MetricRegistry(METRICS[:2])
    assert len(registry) == 2 and registry[0] is METRICS[0] and registry[-1:] == (METRICS[1],)
    spec = registry.register(_spec())
    assert registry.names() == ["counterfactual_accuracy", "parametric_accuracy", "test_only_rate"]
    assert registry.unregister("test_only_rate") is spec and registry.get("test_only_rate") is None
    with pytest.raises(ConfigurationError, match="no metric called 'test_only_rate' is registered"):
        registry.unregister("test_only_rate")
    with pytest.raises(ConfigurationError, match="register a MetricSpec"):
        registry.register("test_only_rate")  # type: ignore[arg-type]


def test_the_derived_tables_are_flags_on_the_specs():
    assert INTERVAL_METRICS == ("counterfactual_accuracy", "parametric_accuracy", "closed_book_accuracy")
    assert dict(PER_PROBE_METRICS) == {
        "counterfactual_accuracy": True, "parametric_accuracy": True, "closed_book_accuracy": True,
        "aligned_accuracy": True, "both_rate": True, "neither_rate": True,
        "counterfactual_probability": False, "logprob_margin": False, "context_lift": False,
        "irrelevant_robustness": True, "utilisation": True, "ambiguous_rate": True,
    }
    assert set(PARAMETRIC_METRICS) == set(NEEDS_PARAMETRIC)
    assert [s.name for s in METRICS if s.bounds is not None] == ["counterfactual_probability"]
    assert all(s.outcome in (HIT, CONTINUOUS) for s in METRICS if s.per_probe is not None)


def test_registered_metrics_show_in_the_live_views_until_unregistered():
    before = glossary_markdown()
    register_metric(_spec(interval=True, needs_parametric=True))
    try:
        assert METRICS[-1].name == "test_only_rate"
        assert INTERVAL_METRICS[-1] == "test_only_rate" and PARAMETRIC_METRICS[-1] == "test_only_rate"
        assert PER_PROBE_METRICS["test_only_rate"] is True
        assert "| `test_only_rate` | `tonly` | loglik |  | higher | a metric for a test |" in glossary_markdown()
    finally:
        unregister_metric("test_only_rate")
    assert "test_only_rate" not in PER_PROBE_METRICS and "test_only_rate" not in INTERVAL_METRICS
    assert glossary_markdown() == before


def test_intervals_and_outcomes_of_a_registered_metric_follow_its_definition():
    """A continuous metric with bounds: t interval clipped to them; a hit/miss one: Wilson, bool outcomes."""
    scores = np.zeros((30, 1, 2))
    scores[:, 0, 0] = 12.0
    scores[0, 0, 0] = -3.0
    register_metric(_spec("squashed_margin", short="sq", outcome=CONTINUOUS, bounds=(0.0, 1.0),
                          per_probe=lambda t: 1.0 / (1.0 + np.exp(-(t.counterfactual() - t.rival())))))
    try:
        targets = [("k/sq", "squashed_margin", None), ("k/cf", "counterfactual_accuracy", None)]
        out = uncertainty(scores, ["f"] * 30, ("context",), "loglik", targets)
        assert out["k/sq_ci_high"] == 1.0 and 0.0 < out["k/sq_ci_low"] < 1.0  # clipped to its bounds
        expected = uncertainty(scores, ["f"] * 30, ("context",), "loglik",
                               [("k/sq", "counterfactual_probability", None)])
        assert out["k/sq_ci_low"] == expected["k/sq_ci_low"] and out["k/sq_se"] == expected["k/sq_se"]
        assert metric_outcomes(scores, ("context",), "loglik", "squashed_margin").dtype == np.float64
        assert metric_outcomes(scores, ("context",), "loglik", "counterfactual_accuracy").dtype == bool
        assert metric_outcomes(scores, ("context",), "generate", "squashed_margin") is None  # not of this mode
    finally:
        unregister_metric("squashed_margin")
    assert metric_outcomes(scores, ("context",), "loglik", "squashed_margin") is None  # gone: no outcomes


# -- the logged values are those of the computation before the redesign, to the last bit ---------------------------


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _legacy_metrics(t: ScoreTable) -> dict[str, float]:
    """The metric functions as ``ctx_callback.metrics`` wrote them before every metric was defined per probe."""
    gen = t.is_generation
    out = {"counterfactual_accuracy": _nanmean(t.counterfactual()) if gen else
           _nanmean(better(t.counterfactual(), t.rival()))}
    for name, variant in (("parametric_accuracy", "context"), ("closed_book_accuracy", "closed_book"),
                          ("aligned_accuracy", "aligned")):
        if t.has(variant):
            out[name] = _nanmean(t.parametric(variant)) if gen else _nanmean(t.parametric_wins(variant))
    if not gen:
        margin = t.counterfactual() - t.rival()
        out["counterfactual_probability"] = _nanmean(1.0 / (1.0 + np.exp(-margin)))
        out["logprob_margin"] = _nanmean(margin)
        if t.has("closed_book"):
            out["context_lift"] = _nanmean(t.counterfactual() - t.counterfactual("closed_book"))
    else:
        valid = t.context_valid()
        cf, rival = t.counterfactual()[valid], t.rival()[valid]
        out["both_rate"] = float(((cf == 1) & (rival == 1)).mean()) if valid.any() else float("nan")
        out["neither_rate"] = float(((cf == 0) & (rival == 0)).mean()) if valid.any() else float("nan")
    return out


def _bits(x: float) -> str:
    return "nan" if x != x else x.hex()


@pytest.mark.parametrize("mode", ["loglik", "generate"])
def test_logged_values_are_bit_identical_to_the_computation_before(tokenizer, mode):
    model = make_tiny_llama(tokenizer, seed=6)
    for probes in (probes_from_records(capital_records()), mixed_probes()):
        result = ProbeScorer(probes, tokenizer, mode=mode, variants=ALL, max_new_tokens=4).score(model).result
        families = [probes[int(i)].family for i in result.probe_indices]
        logged = compute_metrics(result.scores, families, result.variants, mode=mode,
                                 option_scores=result.option_scores, option_roles=result.option_roles)
        for family in (None, *sorted(set(families))):
            rows = np.array([family in (None, f) for f in families])
            table = ScoreTable(result.scores[rows], {v: c for c, v in enumerate(result.variants)}, mode,
                               None if result.option_scores is None else result.option_scores[rows],
                               None if result.option_roles is None else result.option_roles[rows])
            for name, value in _legacy_metrics(table).items():
                assert _bits(logged[metric_key(name, family)]) == _bits(value), (family, name)
            for spec in METRICS:  # and every per-probe consumer reads the same definition
                outcomes = metric_outcomes(result.scores[rows], result.variants, mode, spec.name,
                                           options=table.options, option_roles=table.option_roles)
                if outcomes is not None:
                    values = np.asarray(outcomes, dtype=np.float64)
                    assert _bits(_nanmean(values)) == _bits(logged[metric_key(spec.name, family)]), spec.name


# -- the Extending promise: one registration, seen by every consumer of a real run ----------------------------------

NAME = "memory_kept_rate"


def _memory_kept(t: ScoreTable) -> np.ndarray:
    """The parametric answer wins by more than 0.1 nats under the counterfactual context (one hit/miss per probe)."""
    return better(t.rival() - 0.1, t.counterfactual())


@pytest.fixture
def memory_kept_metric():
    spec = register_metric(MetricSpec(
        NAME, "share of probes whose parametric answer wins by more than 0.1 nats in context (test only)",
        short="kept", modes=("loglik",), per_probe=_memory_kept, outcome=HIT, interval=True, in_summary_table=True,
        plot_label="memory kept (test only)", needs_parametric=True,
    ))
    yield spec
    unregister_metric(NAME)


def _hits_from_log(rows: list[dict], step: int) -> np.ndarray:
    """The new metric's per-probe outcomes recomputed from the probe log's ``cf``/``par`` (rounded to 5 decimals)."""
    return np.array([float(r["par"] - 0.1 > r["cf"]) for r in rows if r["step"] == step])


def test_a_metric_registered_in_one_place_reaches_every_consumer(memory_kept_metric, tokenizer, tmp_path,
                                                                   probes_file):
    from ctx_callback import ContextRelianceCallback
    from ctx_callback.cli import SCAN_JSON, main
    from ctx_callback.outcomes import PROBES_FILE, read_probe_rows
    from ctx_callback.stats import mcnemar_exact, wilson_interval

    key = metric_key(NAME)
    model = make_tiny_llama(tokenizer, seed=0)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=6, save_strategy="steps", save_steps=2,
                           learning_rate=2e-2)
    trainer.add_callback(ContextRelianceCallback(trainer, probes=PROBES, eval_steps=2, monitor=NAME))
    trainer.train()
    rows = [r for r in trainer.state.log_history if key in r]
    log = read_probe_rows(tmp_path / PROBES_FILE)
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    for row in rows:  # the logged row: the value, per family too, and its interval, from the per-probe outcomes
        hits = _hits_from_log(log, row["step"])
        assert len(hits) == len(PROBES) and row[key] == pytest.approx(hits.mean(), abs=1e-12)
        assert row[metric_key(NAME, "capitals")] == row[key]
        low, high = wilson_interval(int(hits.sum()), hits.size)
        assert (row[key + "_ci_low"], row[key + "_ci_high"]) == pytest.approx((low, high), abs=1e-12)
        assert key + "_se" in row
    # The paired test of the final event against the peak: McNemar on the new metric's per-probe outcomes.
    final = rows[-1]
    peak = int(final[metric_key("peak_step")])
    by_step = {r["step"]: r for r in rows}
    decline = by_step[peak][key] - final[key]
    assert decline > 0.2, "the run must lower the metric for the paired test to mean anything"
    assert final[metric_key("decline_from_peak")] == pytest.approx(decline, abs=1e-12)
    expected = mcnemar_exact(_hits_from_log(log, peak), _hits_from_log(log, final["step"])).p_value
    assert final[metric_key("decline_p_value")] == pytest.approx(expected, abs=1e-12) and expected < 1.0
    # ctx-callback scan: a column (in_summary_table), the monitor, its intervals.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["scan", str(tmp_path), "--probes", str(probes_file), "--device", "cpu", "--monitor", NAME]) == 0
    assert "kept" in out.getvalue().split()
    scan = json.loads((tmp_path / SCAN_JSON).read_text())
    assert scan["monitor"] == key
    assert [r["step"] for r in scan["rows"]] == [2, 4, 6]
    assert all(key in r["metrics"] and key + "_ci_low" in r["intervals"] for r in scan["rows"])
    assert f"peak {key} = " in out.getvalue()
    # The glossary, the plot's curves, the monitor's check for probes without a parametric answer.
    assert f"| `{NAME}` | `kept` | loglik |  | higher |" in glossary_markdown()
    from ctx_callback.monitor import NEEDS_PARAMETRIC
    from ctx_callback.plotting import plot_curves, plot_data

    assert (NAME, "memory kept (test only)") in plot_curves() and NAME in NEEDS_PARAMETRIC
    assert "memory kept (test only)" in [curve.label for curve in plot_data(trainer.state.log_history).curves]
