"""monitor.parse_monitor: names, families, direction and validation, all read from the metric table."""

from __future__ import annotations

import pytest

from ctx_callback.errors import ConfigurationError, CtxCallbackError
from ctx_callback.metrics import METRICS, metric_spec
from ctx_callback.monitor import Monitor, monitorable_metrics, parse_monitor

ALL = ("context", "closed_book", "aligned", "irrelevant")


@pytest.mark.parametrize("name", [
    "counterfactual_accuracy", "ctx_reliance/counterfactual_accuracy", "eval_ctx_reliance/counterfactual_accuracy",
])
def test_prefixes_are_accepted(name):
    assert parse_monitor(name, "loglik", ALL) == Monitor(
        key="ctx_reliance/counterfactual_accuracy", metric="counterfactual_accuracy", family=None,
        greater_is_better=True)


def test_family_is_kept_in_the_key():
    m = parse_monitor("world_facts/logprob_margin", "loglik", ALL)
    assert (m.key, m.metric, m.family) == ("ctx_reliance/world_facts/logprob_margin", "logprob_margin", "world_facts")


@pytest.mark.parametrize("spec", [s for s in METRICS if s.monitorable], ids=lambda s: s.name)
def test_direction_comes_from_the_table(spec):
    mode = spec.modes[0]
    assert parse_monitor(spec.name, mode, ALL).greater_is_better is spec.greater_is_better


def test_lower_is_better_metrics():
    lower = {s.name for s in METRICS if s.monitorable and not s.greater_is_better}
    assert lower == {"parametric_accuracy", "both_rate", "neither_rate", "memorization_ratio", "ambiguous_rate"}


@pytest.mark.parametrize("name, mode, variants, match", [
    ("logprob_margin", "generate", ALL, "Unknown monitor metric 'logprob_margin' for mode='generate'"),
    ("memorization_ratio", "loglik", ALL, "Unknown monitor metric 'memorization_ratio'"),
    ("num_probes", "loglik", ALL, "Unknown monitor metric 'num_probes'"),
    ("accuracy", "loglik", ALL, "choose one of"),
    ("a/b/counterfactual_accuracy", "loglik", ALL, "must look like"),
    ("world_facts/", "loglik", ALL, "must look like"),
    ("context_lift", "loglik", ("context",), "needs the 'closed_book' variant"),
    ("aligned_accuracy", "loglik", ("context", "closed_book"), "needs the 'aligned' variant"),
    ("utilisation", "loglik", ("context", "aligned"), "needs the 'irrelevant' variant"),
    ("utilisation", "loglik", ("context",), "needs the 'aligned' and 'irrelevant' variant"),
    ("counterfactual_accuracy", "sample", ALL, "mode must be one of"),
])
def test_bad_monitors_raise_configuration_errors(name, mode, variants, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        parse_monitor(name, mode, variants)
    assert isinstance(info.value, CtxCallbackError) and isinstance(info.value, ValueError)


def test_mode_and_variants_may_be_left_open():
    # The plot command knows neither the mode nor the variants of the run it draws.
    assert parse_monitor("memorization_ratio").greater_is_better is False
    assert parse_monitor("context_lift", "loglik").key == "ctx_reliance/context_lift"


def test_monitorable_metrics_per_mode():
    loglik = [s.name for s in monitorable_metrics("loglik")]
    generate = [s.name for s in monitorable_metrics("generate")]
    assert "logprob_margin" in loglik and "logprob_margin" not in generate
    assert "both_rate" in generate and "both_rate" not in loglik
    assert "num_probes" not in loglik + generate
    assert set(loglik) | set(generate) == {s.name for s in monitorable_metrics(None)}
    assert metric_spec("parametric_accuracy") in monitorable_metrics("generate")


def test_the_default_monitor_depends_on_the_mode():
    from ctx_callback.monitor import DEFAULT_MONITORS, default_monitor

    assert parse_monitor(None, "loglik", ALL).key == "ctx_reliance/counterfactual_probability"
    assert parse_monitor(None, "generate", ALL).key == "ctx_reliance/counterfactual_accuracy"
    assert parse_monitor(None, None, None).key == "ctx_reliance/counterfactual_accuracy"  # exists in both modes
    for mode, name in DEFAULT_MONITORS.items():
        assert mode in metric_spec(name).modes and metric_spec(name).monitorable
        assert default_monitor(mode) == name
    with pytest.raises(ConfigurationError, match="mode must be one of"):
        default_monitor("beam")
    with pytest.raises(ConfigurationError, match="monitor must be a metric name"):
        parse_monitor(3, "loglik", ALL)


def test_the_callback_and_the_cli_use_the_default_monitor(tokenizer, tiny_model):
    from ctx_callback import ContextRelianceCallback
    from ctx_callback.cli import build_parser
    from ctx_callback.cli.common import parse_monitor_option
    from tests.helpers import PROBES

    assert ContextRelianceCallback(probes=PROBES).monitor_key == "ctx_reliance/counterfactual_probability"
    generate = ContextRelianceCallback(probes=PROBES, mode="generate")
    assert generate.monitor_key == "ctx_reliance/counterfactual_accuracy"
    args = build_parser().parse_args(["probe", "some-model"])
    assert args.monitor is None
    assert parse_monitor_option(args.monitor, args.mode, args.variants).key == "ctx_reliance/counterfactual_probability"
