"""A reduced run of benchmarks/stop_rule_simulation.py: properties of the library's stop rules that could fail."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from ctx_callback.decisions import make_stop_rules

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim():
    path = ROOT / "benchmarks" / "stop_rule_simulation.py"
    spec = importlib.util.spec_from_file_location("stop_rule_simulation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["stop_rule_simulation"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(sim):
    pool = np.asarray(sim.DEFAULT_MARGINS, dtype=np.float64)
    assert pool.size >= 50, "the simulation's default calibration (real margins) is missing"
    return pool, sim.DEFAULT_TAU, sim.DEFAULT_CV


def _stops(sim, model, options, runs, n, schedule, outcome="accuracy", seed=0):
    pool, tau, cv = model
    rng = np.random.default_rng(seed)
    rules = make_stop_rules(warmup=3 * sim.EVENT_STEPS, **options)
    return [sim.simulate_run(rules, rng, pool, tau, n, schedule, outcome, cv) for _ in range(runs)]


def test_significance_rule_false_stops_on_flat_runs_stay_within_a_binomial_bound_of_alpha(sim, model):
    runs, alpha = 150, 0.05
    flat = (np.zeros(20), np.zeros(20))
    options = {"stop_rule": "significant_decline", "alpha": alpha, "sustained_events": 1}
    stops = _stops(sim, model, options, runs, 200, flat)
    false_stops = sum(s is not None for s in stops)
    # At a true rate of alpha, more than this happens with probability < 0.001.
    assert false_stops <= binom.ppf(0.999, runs, alpha), false_stops


def test_patience_one_stops_most_flat_runs(sim, model):
    stops = _stops(sim, model, {"patience": 1}, 40, 200, (np.zeros(20), np.zeros(20)))
    assert np.mean([s is not None for s in stops]) > 0.5


def test_significance_rule_detects_a_twenty_point_fall_soon_after_it(sim, model):
    pool, tau, cv = model
    schedule = sim.shifts(20, 8, sim.shift_for_decline(pool, tau, 0.10),
                          sim.shift_for_decline(pool, tau, 0.20, cv))
    options = {"stop_rule": "significant_decline", "alpha": 0.05, "sustained_events": 1}
    stops = _stops(sim, model, options, 40, 200, schedule, seed=1)
    detected = [s for s in stops if s is not None and s >= 8]
    assert len(detected) >= 36, stops  # at least 90% of the declining runs
    assert np.median(np.array(detected) - 8) <= 1


def test_a_one_event_dip_stops_the_one_event_rule_and_not_the_sustained_default(sim, model):
    pool, tau, cv = model
    schedule = sim.dip_shifts(20, 8, sim.shift_for_decline(pool, tau, 0.10), sim.shift_for_decline(pool, tau, 0.20, cv),
                              1)
    assert schedule[1][8] > 0 and schedule[1][7] == schedule[1][9] == 0  # a dip at event 8 only
    one_event = {"stop_rule": "significant_decline", "sustained_events": 1}
    one = _stops(sim, model, one_event, 30, 200, schedule, "probability")
    sustained = _stops(sim, model, {"stop_rule": "significant_decline"}, 30, 200, schedule, "probability")
    assert sum(s == 8 for s in one) >= 27  # the dip is significant: most one-event runs stop at it
    assert sum(s is not None for s in sustained) <= 1  # the default (2 events) lets the run recover


def test_shift_for_decline_hits_the_requested_drop(sim, model):
    pool, tau, cv = model
    for decline in (0.05, 0.10, 0.20):
        shift = sim.shift_for_decline(pool, tau, decline, cv)
        drop = sim.expected_accuracy(pool, tau) - sim.expected_accuracy(pool, tau, shift, cv)
        assert drop == pytest.approx(decline, abs=1e-6)
