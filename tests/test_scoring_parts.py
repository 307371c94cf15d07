"""The parts the scorer is built from, each on its own: precision, probe hygiene, the out-of-memory back-off, the
result types, answer hits and the model's config (see :mod:`ctx_callback.scoring`)."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

import ctx_callback.scoring as scoring
from ctx_callback import probes_from_records
from ctx_callback.engines import Batcher
from ctx_callback.errors import ConfigurationError
from ctx_callback.isolation import probe_mode
from ctx_callback.matching import answer_hits
from ctx_callback.memory_backoff import log_recovered_round, run_with_backoff, smaller_budget
from ctx_callback.models import config_of
from ctx_callback.precision import PROBE_DTYPES, probe_autocast, resolve_probe_dtype
from ctx_callback.score_results import ScoreReport, ScoreResult
from tests.helpers import capital_records

#: Every name the scorer module exported before it was split, from the module that now holds it.
HOMES = {
    "PROBE_DTYPES": "precision", "check_probe_dtype_device": "precision", "cpu_has_native_bf16": "precision",
    "probe_autocast": "precision", "resolve_probe_dtype": "precision", "probe_mode": "isolation",
    "ScoreResult": "score_results", "ScoreReport": "score_results", "normalize_answer": "matching",
}


@pytest.mark.parametrize(("name", "module"), sorted(HOMES.items()))
def test_scoring_re_exports_every_moved_name(name, module):
    import importlib

    assert name in scoring.__all__
    assert getattr(scoring, name) is getattr(importlib.import_module(f"ctx_callback.{module}"), name)


def test_precision_resolves_names_and_dtypes_and_refuses_the_rest():
    assert resolve_probe_dtype(None) is None
    assert resolve_probe_dtype(torch.bfloat16) == resolve_probe_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ConfigurationError, match="probe_dtype must be None"):
        resolve_probe_dtype("float64")
    linear = torch.nn.Linear(2, 2)
    with probe_autocast(linear, None):
        assert not torch.is_autocast_enabled("cpu")
    with probe_autocast(linear, "bfloat16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == PROBE_DTYPES["bfloat16"]


def test_probe_mode_restores_module_modes_and_rng_states():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    model[1].eval()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with probe_mode(model):
        assert not model.training and not torch.is_grad_enabled()
        random.random(), np.random.rand(), torch.rand(3)  # a probe that draws random numbers
    assert model.training and model[0].training and not model[1].training
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB (a test)")


def test_smaller_budget_halves_until_one_item_then_gives_up(caplog):
    with caplog.at_level(logging.WARNING, logger="ctx_callback"):
        assert smaller_budget(_oom(), Batcher(100, 5), synced_gpus=False,
                              unbatched_engine=lambda: None) == Batcher(50, 2)
        assert smaller_budget(_oom(), Batcher(100, 1), synced_gpus=False, unbatched_engine=lambda: None) is None
        assert smaller_budget(_oom(), Batcher(100, 8), synced_gpus=False, unbatched_engine=lambda: "simple") is None
        assert smaller_budget(_oom(), Batcher(100, 8), synced_gpus=True, unbatched_engine=lambda: None) is None
    messages = [r.getMessage() for r in caplog.records]
    assert "retrying the round with max_batch_tokens=50, max_batch_size=2" in messages[0]
    assert "even with one probe item per forward pass" in messages[1]
    assert "the 'simple' engine runs one row per forward pass" in messages[2]
    assert "sharded parameters" in messages[3]
    assert {r.name for r in caplog.records} == {"ctx_callback.scoring"}  # the logger users already configure


def test_run_with_backoff_retries_with_the_smaller_budget_and_counts_the_retries():
    model = torch.nn.Linear(2, 2)
    budgets = [Batcher(64, 8)]

    def attempt() -> str:
        if budgets[-1].max_batch_size > 2:
            raise _oom()
        return f"ran with {budgets[-1].max_batch_size}"

    def next_budget(err: BaseException, budget: Batcher) -> Batcher | None:
        return smaller_budget(err, budget, synced_gpus=False, unbatched_engine=lambda: None)

    result, retries = run_with_backoff(attempt, model, budgets[0], budgets.append, next_budget)
    assert (result, retries) == ("ran with 2", 2)
    assert budgets == [Batcher(64, 8), Batcher(32, 4), Batcher(16, 2)]


def test_run_with_backoff_restores_the_round_budget_when_no_retry_helps_and_raises_other_errors_at_once():
    model = torch.nn.Linear(2, 2)
    budgets = [Batcher(64, 2)]

    def always_oom() -> None:
        raise _oom()

    with pytest.raises(torch.OutOfMemoryError):
        run_with_backoff(always_oom, model, budgets[0], budgets.append,
                         lambda err, b: smaller_budget(err, b, synced_gpus=False, unbatched_engine=lambda: None))
    assert budgets == [Batcher(64, 2), Batcher(32, 1), Batcher(64, 2)]  # tried one item, then set back

    def broken() -> None:
        raise ValueError("not a memory problem")

    tried = []
    with pytest.raises(ValueError, match="not a memory problem"):
        run_with_backoff(broken, model, Batcher(64, 2), tried.append, lambda err, b: Batcher(1, 1))
    assert tried == []


def test_log_recovered_round_says_nothing_without_retries(caplog):
    with caplog.at_level(logging.WARNING, logger="ctx_callback"):
        log_recovered_round(0, Batcher(8, 1), Batcher(64, 8))
        assert not caplog.records
        log_recovered_round(1, Batcher(8, 1), Batcher(64, 8))
    assert "after 1 out-of-memory retry with max_batch_tokens=8, max_batch_size=1 (configured: 64, 8)" in (
        caplog.records[0].getMessage())


def test_score_result_merge_and_report_records():
    probes = probes_from_records(capital_records(3))
    shard = ScoreResult(np.array([2, 0]), ("context",), np.array([[[-1.0, -2.0]], [[-3.0, np.nan]]]))
    rest = ScoreResult(np.array([1, 0]), ("context",), np.array([[[-5.0, -4.0]], [[-9.0, -9.0]]]))
    merged = ScoreResult.merge([shard, rest])
    assert merged.probe_indices.tolist() == [0, 1, 2]
    assert merged.scores[:, 0, 0].tolist() == [-3.0, -5.0, -1.0]  # probe 0 keeps its first score
    assert merged.nonfinite_scores == 1  # without ``scored``, every "context" cell counts as scored
    merged.scored = np.array([[False], [True], [True]])
    assert merged.nonfinite_scores == 0  # the NaN is in a cell that was not scored
    records = ScoreReport({}, merged, probes).records
    assert [r["id"] for r in records] == [p.id for p in probes]
    assert records[0]["context_counterfactual_logprob"] == -3.0 and records[0]["context_parametric_logprob"] is None


def test_answer_hits_matches_the_longer_answer_first_and_option_letters():
    two = probes_from_records([{"id": "a", "family": "f", "context": "c", "question": "q",
                                "counterfactual_answer": "York", "parametric_answer": "New York"}])[0]
    assert answer_hits(two, "It is New York.") == [False, True]
    assert answer_hits(two, "York, surely") == [True, False]
    choice = probes_from_records([{"id": "m", "family": "f", "context": "c", "question": "q",
                                   "options": ["red", "green", "blue"], "counterfactual_answer": "blue",
                                   "parametric_answer": "green", "list_options": True}])[0]
    hits = answer_hits(choice, "B")
    assert hits == [choice.options[i] == "green" for i in range(3)]


def test_config_of_reads_the_model_or_its_ddp_module():
    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = torch.nn.Linear(2, 2)
    inner.config = object()
    assert config_of(inner) is inner.config
    assert config_of(Wrapper(inner)) is inner.config
    assert config_of(torch.nn.Linear(2, 2)) is None


NEW_MODULES = ["precision", "isolation", "score_results", "memory_backoff", "model_loading", "audit.data",
               "audit.result", "audit.resume", "audit.plot"]


@pytest.mark.parametrize("module", NEW_MODULES)
def test_new_modules_list_exactly_names_that_exist(module):
    import importlib

    mod = importlib.import_module(f"ctx_callback.{module}")
    assert mod.__doc__ and len(mod.__all__) == len(set(mod.__all__))
    for name in mod.__all__:
        assert hasattr(mod, name) and getattr(mod, name).__doc__, f"ctx_callback.{module}.{name}"
