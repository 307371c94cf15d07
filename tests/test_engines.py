"""The engines package: the length-sorted batcher, the registry, "auto"'s fallback, and the length check.

Engine agreement is parametrized over the registry, so an engine added to ``LOGLIK_ENGINES`` is tested here
against the unbatched reference without touching this file.
"""

from __future__ import annotations

import logging
import random
import re

import numpy as np
import pytest
import torch

from ctx_callback import (
    ConfigurationError,
    CtxCallbackError,
    ProbeFormatError,
    ProbeLengthError,
    ProbeScorer,
    PromptFormat,
    probes_from_records,
)
from ctx_callback import engines as engines_pkg
from ctx_callback.engines import (
    LOGLIK_ENGINES,
    AutoEngine,
    BatchedEngine,
    Batcher,
    LoglikEngine,
    PrefixCacheEngine,
    SimpleEngine,
    engine_names,
    register_engine,
)
from tests.helpers import LOGLIK_ATOL, capital_records, make_tiny_llama

# -- the batcher (pure: no model) -------------------------------------------------------------------------------------


def _check_batches(batches, lengths, batcher, rows_per_unit=1):
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert flat == sorted(range(len(lengths)), key=lambda i: (lengths[i], i))  # (length, index) order throughout
    for batch in batches:
        assert batch
        rows = len(batch) * rows_per_unit
        if len(batch) > 1:  # only a lone unit may exceed a budget
            assert rows * max(lengths[i] for i in batch) <= batcher.max_batch_tokens
            assert rows <= batcher.max_batch_size
    for batch, following in zip(batches, batches[1:]):  # greedy: every cut was needed
        rows = (len(batch) + 1) * rows_per_unit
        longest = max(lengths[i] for i in [*batch, following[0]])
        assert rows * longest > batcher.max_batch_tokens or rows > batcher.max_batch_size


def test_batcher_worked_example():
    # (length, index) order: 4 (1), 1 (3), 2 (3), 0 (5), 3 (10); budget 10 tokens
    assert Batcher(max_batch_tokens=10, max_batch_size=64).batches([5, 3, 3, 10, 1]) == [[4, 1, 2], [0], [3]]
    assert Batcher(max_batch_tokens=10, max_batch_size=2).batches([5, 3, 3, 10, 1]) == [[4, 1], [2, 0], [3]]
    assert Batcher().batches([]) == []


def test_batcher_ties_break_by_index():
    assert Batcher(max_batch_tokens=100, max_batch_size=2).batches([7, 7, 7, 7, 7]) == [[0, 1], [2, 3], [4]]


def test_batcher_lone_over_long_unit():
    batcher = Batcher(max_batch_tokens=10, max_batch_size=8)
    batches = batcher.batches([2, 50, 3, 11])
    assert batches == [[0, 2], [3], [1]]
    _check_batches(batches, [2, 50, 3, 11], batcher)


def test_batcher_rows_per_unit():
    lengths = [4] * 6
    # two rows per unit: 4 rows max -> 2 units; 4 rows x 4 tokens = 16 fits the token budget
    assert Batcher(max_batch_tokens=16, max_batch_size=4).batches(lengths, rows_per_unit=2) == [[0, 1], [2, 3], [4, 5]]
    # the token budget counts rows, not units: 3 units x 2 rows x 4 = 24 > 20
    assert Batcher(max_batch_tokens=20, max_batch_size=64).batches(lengths, rows_per_unit=2) == [[0, 1], [2, 3], [4, 5]]
    # more rows per unit than the row budget: every unit alone
    assert Batcher(max_batch_tokens=1000, max_batch_size=1).batches([1, 2, 3], rows_per_unit=2) == [[0], [1], [2]]


@pytest.mark.parametrize("seed", range(25))
def test_batcher_budgets_and_coverage_random(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 80))]
    batcher = Batcher(max_batch_tokens=rng.randint(1, 400), max_batch_size=rng.randint(1, 12))
    rows_per_unit = rng.choice([1, 2, 3])
    _check_batches(batcher.batches(lengths, rows_per_unit), lengths, batcher, rows_per_unit)


def test_batcher_rejects_bad_budgets():
    with pytest.raises(ConfigurationError, match="max_batch_tokens and max_batch_size must be >= 1"):
        Batcher(max_batch_tokens=0)
    with pytest.raises(ConfigurationError, match="rows_per_unit"):
        Batcher().batches([1], rows_per_unit=0)


# -- the registry -----------------------------------------------------------------------------------------------------


def _mixed_probes():
    """Capitals, plus probes with multi-token answers and prompts of different lengths."""
    rows = capital_records()
    rows.append({"id": "mix/hamlet", "family": "mix",
                 "context": "An old review. " * 5 + "Hamlet was written by Jane Austen, the review says.",
                 "question": "Who wrote Hamlet?", "counterfactual_answer": "Jane Austen",
                 "parametric_answer": "William Shakespeare"})
    rows.append({"id": "mix/water", "family": "mix", "context": "Water boils at 50 degrees Celsius at sea level.",
                 "question": "At what temperature does water boil at sea level, in degrees Celsius?",
                 "counterfactual_answer": "50 degrees", "parametric_answer": "100 degrees",
                 "aligned_context": "Water boils at 100 degrees Celsius at sea level."})
    return probes_from_records(rows)


@pytest.fixture(scope="module")
def agreement_model(tokenizer):
    return make_tiny_llama(tokenizer, seed=4)


@pytest.fixture(scope="module")
def reference_scores(tokenizer, agreement_model):
    """The "simple" engine's scores per prompt format, computed once."""
    cache = {}

    def get(prompt_format):
        if prompt_format not in cache:
            scorer = ProbeScorer(_mixed_probes(), tokenizer, prompt_format, engine="simple")
            cache[prompt_format] = scorer.score_raw(agreement_model).scores
        return cache[prompt_format]

    return get


def test_registry_names_and_classes():
    assert list(engine_names()) == ["auto", *LOGLIK_ENGINES]
    assert {"prefix", "batched", "simple"} <= set(LOGLIK_ENGINES)
    for name, cls in LOGLIK_ENGINES.items():
        assert issubclass(cls, LoglikEngine) and cls.name == name


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
@pytest.mark.parametrize("engine", ["auto", *LOGLIK_ENGINES])
def test_every_registered_engine_equals_the_simple_reference(tokenizer, agreement_model, reference_scores, engine,
                                                             prompt_format):
    ref = reference_scores(prompt_format)
    assert np.isfinite(ref).all()
    # small budgets force several length buckets and padding inside each
    scorer = ProbeScorer(_mixed_probes(), tokenizer, prompt_format, engine=engine, max_batch_tokens=250,
                         max_batch_size=6)
    # Other batch shapes than the unbatched reference: equal up to float32 summation order (measured <= 3.8e-6).
    np.testing.assert_allclose(scorer.score_raw(agreement_model).scores, ref, atol=LOGLIK_ATOL, rtol=0)


def test_unknown_engine_lists_the_names(tokenizer, capital_probes):
    names = re.escape(str(list(engine_names())))
    with pytest.raises(ConfigurationError, match=rf"engine must be one of {names}, got 'fastest'"):
        ProbeScorer(capital_probes, tokenizer, engine="fastest")


def test_register_engine_makes_a_new_engine_available(tokenizer, tiny_model, monkeypatch):
    monkeypatch.setattr(engines_pkg, "LOGLIK_ENGINES", LOGLIK_ENGINES.copy())

    @register_engine("simple_again")
    class SimpleAgain(SimpleEngine):
        pass

    assert engines_pkg.LOGLIK_ENGINES["simple_again"] is SimpleAgain and SimpleAgain.name == "simple_again"
    assert "simple_again" in engine_names()
    probes = probes_from_records(capital_records(2))
    got = ProbeScorer(probes, tokenizer, engine="simple_again")
    assert got.active_engine == "simple_again" and isinstance(got.loglik_engine, SimpleAgain)
    ref = ProbeScorer(probes, tokenizer, engine="simple")
    # Exact: the same engine code on the same forward passes (a subclass that changes nothing).
    np.testing.assert_array_equal(got.score_raw(tiny_model).scores, ref.score_raw(tiny_model).scores)
    with pytest.raises(ConfigurationError, match="is taken"):
        register_engine("auto")(SimpleAgain)
    with pytest.raises(ConfigurationError, match="is taken"):
        register_engine("batched")(SimpleAgain)
    assert "simple_again" not in LOGLIK_ENGINES  # the real registry is untouched


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "beam"}, "mode must be one of"),
    ({"max_batch_tokens": 0}, "max_batch_tokens, max_batch_size and max_new_tokens must be >= 1"),
    ({"max_new_tokens": 0}, "max_batch_tokens, max_batch_size and max_new_tokens must be >= 1"),
    ({"variants": ("context", "counterfactual")}, "Unknown probe variants"),
])
def test_bad_arguments_raise_configuration_error(tokenizer, capital_probes, kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        ProbeScorer(capital_probes, tokenizer, **kwargs)


def test_no_probes_or_no_tokenizer_raise_configuration_error(tokenizer, capital_probes):
    with pytest.raises(ConfigurationError, match="at least one probe"):
        ProbeScorer([], tokenizer)
    with pytest.raises(ConfigurationError, match="training tokenizer"):
        ProbeScorer(capital_probes, None)


# -- "auto": the prefix cache, or batched per model class ---------------------------------------------------------


def _no_cache_llama(tokenizer, seed):
    """A tiny Llama (the weights of ``make_tiny_llama(tokenizer, seed)``) whose forward rejects any KV cache."""
    from transformers import LlamaForCausalLM

    class NoCacheLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
                raise TypeError("NoCacheLlama takes no cache")
            return super().forward(*args, **kwargs)

    plain = make_tiny_llama(tokenizer, seed=seed)
    model = NoCacheLlama(plain.config).float()
    model.load_state_dict(plain.state_dict())
    return plain, model


def _failure_warnings(caplog):
    return [r for r in caplog.records if "prefix-cache engine failed" in r.getMessage()]


def test_auto_falls_back_to_batched_per_model_class_and_warns_once(tokenizer, capital_probes, caplog):
    plain, no_cache = _no_cache_llama(tokenizer, seed=5)
    scorer = ProbeScorer(capital_probes, tokenizer, engine="auto", max_batch_tokens=300)
    batched = ProbeScorer(capital_probes, tokenizer, engine="batched", max_batch_tokens=300)
    prefix = ProbeScorer(capital_probes, tokenizer, engine="prefix", max_batch_tokens=300)
    assert scorer.active_engine == "prefix"

    with caplog.at_level(logging.WARNING):
        first = scorer.score_raw(no_cache).scores
        second = scorer.score_raw(no_cache).scores
    assert len(_failure_warnings(caplog)) == 1
    assert "NoCacheLlama" in _failure_warnings(caplog)[0].getMessage()
    expected = batched.score_raw(no_cache).scores
    # Exact: "auto" delegates to the very engine it names, with the same budgets, so it runs the same forward passes
    # (the failed prefix attempt raises before computing anything). Users may rely on auto == the engine it picked.
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    assert scorer.active_engine == "batched"
    assert scorer.engine == "auto"  # the requested engine never changes

    auto = scorer.loglik_engine
    assert isinstance(auto, AutoEngine)
    assert list(auto.prefix_failures) == [type(no_cache)]
    assert auto.prefix_failures[type(no_cache)].startswith("TypeError: NoCacheLlama takes no cache")
    items = scorer.encoded.items
    assert isinstance(auto.engine_for(type(no_cache), items), BatchedEngine)
    # the record is per model class: a plain Llama still gets the prefix cache, with no new warning
    assert isinstance(auto.engine_for(type(plain), items), PrefixCacheEngine)
    with caplog.at_level(logging.WARNING):  # exact: auto runs the prefix engine's forward passes, same budgets
        np.testing.assert_array_equal(scorer.score_raw(plain).scores, prefix.score_raw(plain).scores)
    assert len(_failure_warnings(caplog)) == 1


def test_explicit_prefix_reraises(tokenizer, capital_probes, caplog):
    _, no_cache = _no_cache_llama(tokenizer, seed=5)
    scorer = ProbeScorer(capital_probes, tokenizer, engine="prefix")
    with caplog.at_level(logging.WARNING), pytest.raises(TypeError, match="NoCacheLlama takes no cache"):
        scorer.score_raw(no_cache)
    assert not _failure_warnings(caplog)
    assert scorer.active_engine == "prefix"


def test_without_a_shared_prefix_auto_and_prefix_use_batched(tokenizer, capital_probes):
    # context prompts start with "The capital", closed-book prompts with "Q:": no shared preamble
    fmt = PromptFormat.from_template("{context}\nQ: {question}\nA:", closed_book_template="Q: {question}\nA:")
    _, no_cache = _no_cache_llama(tokenizer, seed=6)
    expected = ProbeScorer(capital_probes, tokenizer, fmt, engine="batched").score_raw(no_cache).scores
    for engine in ("auto", "prefix"):
        scorer = ProbeScorer(capital_probes, tokenizer, fmt, engine=engine)
        assert scorer.encoded.shared_prefix == ()
        assert not PrefixCacheEngine(scorer.encoded, scorer.batcher).applicable(scorer.encoded.items)
        # the no-cache model would raise if the prefix engine ran; exact: the batched engine's own forward passes
        np.testing.assert_array_equal(scorer.score_raw(no_cache).scores, expected)
    assert ProbeScorer(capital_probes, tokenizer, fmt, engine="auto").active_engine == "batched"


def test_prefix_applicability_needs_one_shared_token(tokenizer, capital_probes):
    scorer = ProbeScorer(capital_probes, tokenizer)
    engine = PrefixCacheEngine(scorer.encoded, scorer.batcher)
    items = scorer.encoded.items
    shortest = min(len(item.prompt_ids) for item in items)
    assert engine.prefix_length(items) == min(len(scorer.encoded.shared_prefix), shortest - 1) >= 1
    assert engine.applicable(items)
    assert not engine.applicable([])


# -- generation -------------------------------------------------------------------------------------------------------


def test_generation_stop_tokens_and_synced_gpus(tokenizer, tiny_model):
    probes = probes_from_records(capital_records(2))
    scorer = ProbeScorer(probes, tokenizer, mode="generate", variants=("context",), max_new_tokens=2)
    stop = scorer.generation_engine.stop_ids
    assert stop[0] == tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop and len(set(stop)) == len(stop)
    seen = []
    original = tiny_model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["synced_gpus"])
        return original(*args, **{**kwargs, "synced_gpus": False})  # no process group here

    tiny_model.generate = spy
    scorer.synced_gpus = True  # what the callback sets under FSDP / ZeRO-3
    report = scorer.score(tiny_model)
    assert seen and all(seen)
    assert all(isinstance(r["context_generation"], str) for r in report.records)


# -- the length check -------------------------------------------------------------------------------------------------


def test_probe_length_error_at_the_boundary(tokenizer, capital_probes):
    longest = max(item.total_length for item in ProbeScorer(capital_probes, tokenizer).encoded.items)
    ProbeScorer(capital_probes, tokenizer, max_length=longest)  # fits exactly
    with pytest.raises(ProbeLengthError, match=rf"maximum length of {longest - 1} tokens: .*{longest} tokens") as info:
        ProbeScorer(capital_probes, tokenizer, max_length=longest - 1)
    assert isinstance(info.value, CtxCallbackError) and isinstance(info.value, ValueError)
    assert not isinstance(info.value, ProbeFormatError)  # not a format problem


# -- any number of answers per item (multiple choice, audit targets) --------------------------------------------------


def _items_with_varying_answer_counts(tokenizer):
    """Items with 1, 2, 3 and 4 answers of different lengths, built from real encoded prompts."""
    from dataclasses import replace

    scorer = ProbeScorer(_mixed_probes(), tokenizer, "chat", variants=("context",))
    extra = [tuple(tokenizer(" Jane Austen wrote it", add_special_tokens=False)["input_ids"]),
             tuple(tokenizer("42", add_special_tokens=False)["input_ids"])]
    items = []
    for k, item in enumerate(scorer.encoded.items):
        n = 1 + k % 4
        answers = (item.answer_ids + tuple(extra))[:n]
        items.append(replace(item, answer_ids=answers))
    return scorer.encoded, items


@pytest.mark.parametrize("engine", list(LOGLIK_ENGINES))
def test_engines_score_any_number_of_answers_like_the_reference(tokenizer, agreement_model, engine):
    encoded, items = _items_with_varying_answer_counts(tokenizer)
    assert {len(item.answer_ids) for item in items} == {1, 2, 3, 4}

    with torch.no_grad():
        reference = SimpleEngine(encoded, Batcher()).score(agreement_model, items)
        got = LOGLIK_ENGINES[engine](encoded, Batcher(max_batch_tokens=120, max_batch_size=5)).score(
            agreement_model, items)
    assert [len(v) for v in got] == [len(item.answer_ids) for item in items]
    # Other batch shapes than the unbatched reference (measured <= 1.9e-6): see LOGLIK_ATOL.
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(reference), atol=LOGLIK_ATOL, rtol=0)


def test_batcher_rows_per_unit_per_item():
    # rows 1, 3, 2, 4 (length 4 each): a budget of 5 rows puts 1+3 together, then 2, then 4
    assert Batcher(max_batch_tokens=1000, max_batch_size=5).batches([4, 4, 4, 4], rows_per_unit=[1, 3, 2, 4]) == [
        [0, 1], [2], [3]]
    # token budget counts rows x longest: 2 rows x 5 tokens fits 10, a third row does not
    assert Batcher(max_batch_tokens=10, max_batch_size=64).batches([5, 5], rows_per_unit=[2, 1]) == [[0], [1]]
    with pytest.raises(ConfigurationError, match="2 entries for 3 units"):
        Batcher().batches([1, 2, 3], rows_per_unit=[1, 1])
