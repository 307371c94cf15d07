"""Faults during a probe round (issue 13, part 3): each one either lets training continue or stops cleanly, loses no
logged row, and says clearly what happened.

1. Out of memory inside a probe forward pass: the round is retried with smaller batches (same numbers); a batch of
   one that still fails fails the round, which the callback logs as ``probe_failed`` while training continues.
2. NaN/inf logits: the round is flagged (``probe_failed``, ``nonfinite_scores``) and can never be the peak.
3. A tracker that raises on the callback's row: training continues, every row stays in ``state.log_history``.
4. 10,000 probes: encoded once, bounded memory per round, every forward pass within ``max_batch_tokens``.

The faults are real: forward (pre-)hooks on a real tiny Llama raise or rewrite its real outputs, and the callback
tests run real ``SFTTrainer`` steps.
"""

from __future__ import annotations

import logging
import math
import time
import tracemalloc

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from ctx_callback import ContextRelianceCallback, ProbeScorer, probes_from_records
from ctx_callback.engines import Batcher
from tests.helpers import PROBES, capital_records, make_tiny_llama, make_trainer

FAILED = "ctx_reliance/probe_failed"
NONFINITE = "ctx_reliance/nonfinite_scores"
CF_PROB = "ctx_reliance/counterfactual_probability"
PEAK_STEP = "ctx_reliance/peak_step"


def _mixed_probes():
    """Capitals plus probes with multi-token answers and prompts of different lengths."""
    rows = capital_records()
    rows.append({"id": "mix/hamlet", "family": "mix",
                 "context": "An old review. " * 5 + "Hamlet was written by Jane Austen, the review says.",
                 "question": "Who wrote Hamlet?", "counterfactual_answer": "Jane Austen",
                 "parametric_answer": "William Shakespeare"})
    rows.append({"id": "mix/water", "family": "mix", "context": "Water boils at 50 degrees Celsius at sea level.",
                 "question": "At what temperature does water boil at sea level, in degrees Celsius?",
                 "counterfactual_answer": "50 degrees", "parametric_answer": "100 degrees"})
    return probes_from_records(rows)


def _input_ids(args, kwargs) -> torch.Tensor:
    return kwargs["input_ids"] if "input_ids" in kwargs else args[0]


class OutOfMemoryAbove:
    """A forward pre-hook that raises ``torch.OutOfMemoryError`` for eval-mode forward passes whose input has more
    than ``max_rows`` rows or more than ``max_tokens`` padded tokens (rows x width), as a full accelerator would."""

    def __init__(self, max_rows: int | None = None, max_tokens: int | None = None, error=torch.OutOfMemoryError):
        self.max_rows, self.max_tokens, self.error = max_rows, max_tokens, error
        self.shapes: list[tuple[int, int]] = []  # every eval-mode forward: (rows, width)
        self.raised = 0

    def __call__(self, module, args, kwargs):
        if module.training:
            return None
        rows, width = _input_ids(args, kwargs).shape
        self.shapes.append((rows, width))
        if (self.max_rows is not None and rows > self.max_rows) or (
                self.max_tokens is not None and rows * width > self.max_tokens):
            self.raised += 1
            raise self.error(f"CUDA out of memory. Tried to allocate a batch of {rows} x {width} tokens (simulated)")
        return None

    @property
    def passed(self) -> list[tuple[int, int]]:
        """Shapes of the forward passes that did not raise."""
        return [s for s in self.shapes if not ((self.max_rows is not None and s[0] > self.max_rows)
                                               or (self.max_tokens is not None and s[0] * s[1] > self.max_tokens))]


# ----------------------------------------------------------------------------------------------------------------
# 1. Out of memory inside a probe forward pass
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("engine", "mode"), [("auto", "loglik"), ("batched", "loglik"), ("auto", "generate")])
def test_oom_retries_the_round_with_smaller_batches_and_gives_the_same_scores(tokenizer, caplog, engine, mode):
    model = make_tiny_llama(tokenizer, seed=3)
    kwargs = dict(engine=engine, mode=mode, max_new_tokens=3)
    reference = ProbeScorer(_mixed_probes(), tokenizer, **kwargs).score_raw(model)

    scorer = ProbeScorer(_mixed_probes(), tokenizer, **kwargs)
    hook = OutOfMemoryAbove(max_rows=5, max_tokens=400)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with caplog.at_level(logging.WARNING, logger="ctx_callback"):
            first = scorer.score_raw(model)
        assert hook.raised >= 1
        # The same numbers as an unconstrained round: batching changes the float summation order only. Per-token
        # log-probabilities are float32 (log|V| = 10.8 has a float32 spacing of 1e-6), so the sums agree to float32
        # precision: measured up to 1.9e-6 absolute on a -43 sum, i.e. under 1e-7 relative.
        np.testing.assert_allclose(first.scores, reference.scores, rtol=1e-6, atol=0)
        assert first.generations == reference.generations
        retried = [r.getMessage() for r in caplog.records if "retrying the round" in r.getMessage()]
        assert retried and "out of memory" in retried[0]
        assert "max_batch_tokens=8192, max_batch_size=64" in retried[0]
        assert "retrying the round with max_batch_tokens=4096, max_batch_size=32" in retried[0]
        done = [r.getMessage() for r in caplog.records if "completed after" in r.getMessage()]
        assert len(done) == 1 and f"max_batch_size={scorer.batcher.max_batch_size}" in done[0]
        # Every forward pass that ran fits the simulated memory; the working budget is remembered for later rounds,
        # while the configured budget is unchanged (reset_budget() goes back to it).
        assert scorer.batcher.max_batch_size <= 4 and scorer.batcher.max_batch_tokens < 8192
        assert (scorer.max_batch_tokens, scorer.max_batch_size) == (8192, 64)
        if engine == "auto" and mode == "loglik":
            assert scorer.active_engine == "prefix"  # an OOM is no reason to give up the prefix cache
        caplog.clear()
        hook.raised = 0
        with caplog.at_level(logging.WARNING, logger="ctx_callback"):
            second = scorer.score_raw(model)
        assert hook.raised == 0 and not caplog.records  # later rounds start from the working budget
        np.testing.assert_array_equal(second.scores, first.scores)  # exact: the same budget, so the same batches
        scorer.reset_budget()
        assert scorer.batcher == Batcher(8192, 64)
    finally:
        handle.remove()


def test_oom_detection_is_by_type_or_message(tokenizer, capital_probes):
    model = make_tiny_llama(tokenizer)
    reference = ProbeScorer(capital_probes, tokenizer, engine="batched").score_raw(model).scores
    # A RuntimeError whose message says "out of memory" (older torch, other backends) is retried like the type.
    scorer = ProbeScorer(capital_probes, tokenizer, engine="batched")
    handle = model.register_forward_pre_hook(OutOfMemoryAbove(max_rows=4, error=RuntimeError), with_kwargs=True)
    try:
        np.testing.assert_allclose(scorer.score_raw(model).scores, reference, rtol=1e-6, atol=0)
    finally:
        handle.remove()

    # Any other error is not an out-of-memory error: raised at once, no retry.
    def shape_error(module, args, kwargs):
        if not module.training:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    scorer = ProbeScorer(capital_probes, tokenizer, engine="batched")
    handle = model.register_forward_pre_hook(shape_error, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            scorer.score_raw(model)
        assert scorer.batcher == Batcher(8192, 64)
    finally:
        handle.remove()


def test_oom_is_not_retried_under_sharded_parameters_or_by_the_unbatched_engine(tokenizer, capital_probes, caplog):
    model = make_tiny_llama(tokenizer)
    hook = OutOfMemoryAbove(max_rows=4)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        # FSDP / ZeRO-3: the other ranks wait inside this forward's collective; a retry cannot bring them back.
        scorer = ProbeScorer(capital_probes, tokenizer, engine="batched")
        scorer.synced_gpus = True
        with caplog.at_level(logging.WARNING, logger="ctx_callback"), pytest.raises(torch.OutOfMemoryError):
            scorer.score_raw(model)
        assert hook.raised == 1 and len(hook.shapes) == 1
        assert "sharded parameters" in caplog.text and "not retried" in caplog.text
        assert scorer.batcher == Batcher(8192, 64)

        # "simple" runs one row per forward pass already: there is no smaller batch to retry with.
        hook.max_rows, hook.max_tokens, hook.raised = None, 10, 0
        caplog.clear()
        scorer = ProbeScorer(capital_probes, tokenizer, engine="simple")
        with caplog.at_level(logging.WARNING, logger="ctx_callback"), pytest.raises(torch.OutOfMemoryError):
            scorer.score_raw(model)
        assert hook.raised == 1
        assert "does not batch" in caplog.text
    finally:
        handle.remove()


def test_oom_even_with_one_row_fails_the_round_and_training_continues(tokenizer, tmp_path, caplog):
    model = make_tiny_llama(tokenizer)
    hook = OutOfMemoryAbove(max_rows=0)  # every probe forward pass runs out of memory; training ones do not
    model.register_forward_pre_hook(hook, with_kwargs=True)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=4)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=2, engine="batched", variants=("context",))
    trainer.add_callback(callback)
    with caplog.at_level(logging.WARNING, logger="ctx_callback"):
        trainer.train()

    assert trainer.state.global_step == 4
    history = trainer.state.log_history
    assert [row["step"] for row in history if row.get(FAILED) == 1.0] == [0, 2, 4]
    assert [row["step"] for row in history if "loss" in row] == [1, 2, 3, 4]
    # Each round tried max_batch_size 64, 32, 16, 8, 4, 2 and 1 (the first forward pass of each try raised; the
    # round has 7 probes x 2 answer rows).
    assert [rows for rows, _ in hook.shapes] == [14, 14, 14, 8, 4, 2, 1] * 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("even with one probe item per forward pass" in m for m in messages) == 3
    assert sum("probe at step" in m and "failed (OutOfMemoryError" in m for m in messages) == 3
    # A round that fails even at one row does not leave the scorer's budget reduced.
    assert callback.scorer.batcher == Batcher(8192, 64)
    assert model.training


# ----------------------------------------------------------------------------------------------------------------
# 2. NaN / inf logits
# ----------------------------------------------------------------------------------------------------------------


class PoisonLogits:
    """A forward hook that rewrites a real forward's logits in eval mode, while ``active()`` says so: rows whose input
    contains ``nan_token`` become NaN, and the ``minus_inf_columns`` (answer tokens) become -inf everywhere, which makes
    those answers' log-probabilities -inf (an inf that *raises* the counterfactual metrics of the other answer)."""

    def __init__(self, nan_token: int, minus_inf_columns: list[int], active=lambda: True):
        self.nan_token, self.minus_inf_columns, self.active = nan_token, minus_inf_columns, active

    def __call__(self, module, args, kwargs, output):
        if module.training or not self.active():
            return None
        ids, logits = _input_ids(args, kwargs), output.logits
        logits[..., self.minus_inf_columns] = -math.inf
        rows = (ids == self.nan_token).any(dim=1)
        if logits.dim() == 3:
            logits[rows] = math.nan
        else:  # a boolean logits_to_keep: the kept positions of each row, row after row
            keep = kwargs["logits_to_keep"]
            ends = keep.sum(dim=1).cumsum(0)
            starts = ends - keep.sum(dim=1)
            for r in rows.nonzero()[:, 0].tolist():
                logits[starts[r]:ends[r]] = math.nan
        return output


def _poison_for(tokenizer, scorer, nan_country="Egypt", inf_countries=("France", "Japan", "Italy", "Germany")):
    """The hook's tokens: the country name's token, and the last token of some parametric answers."""
    (nan_token,) = tokenizer(f" {nan_country}", add_special_tokens=False)["input_ids"]
    by_id = {p.id: i for i, p in enumerate(scorer.probes)}
    items = {item.probe_index: item for item in scorer.encoded.items if item.variant == "context"}
    columns = [items[by_id[f"capitals/{c.lower()}"]].parametric_ids[-1] for c in inf_countries]
    used_elsewhere = {t for item in scorer.encoded.items for t in item.counterfactual_ids}
    assert not used_elsewhere & set(columns)
    return nan_token, columns


def test_nonfinite_scores_are_counted_and_the_metrics_use_the_finite_rest(tokenizer, capital_probes):
    model = make_tiny_llama(tokenizer)
    scorer = ProbeScorer(capital_probes, tokenizer, engine="batched")  # all three variants
    clean = scorer.score_raw(model)
    assert clean.nonfinite_scores == 0 and clean.scored is not None
    nan_token, columns = _poison_for(tokenizer, scorer, inf_countries=("Japan",))
    handle = model.register_forward_hook(PoisonLogits(nan_token, columns), with_kwargs=True)
    try:
        result = scorer.score_raw(model)
    finally:
        handle.remove()
    egypt = [p.id for p in scorer.probes].index("capitals/egypt")
    japan = [p.id for p in scorer.probes].index("capitals/japan")
    # Egypt: every scored (variant, answer) is NaN; Japan: the parametric answer is -inf in every variant.
    assert np.isnan(result.scores[egypt][result.scored[egypt]]).all()
    assert np.isneginf(result.scores[japan, :, 1][result.scored[japan]]).all()
    expected = 2 * result.scored[egypt].sum() + result.scored[japan].sum()
    assert result.nonfinite_scores == expected
    # Cells that were never scored (an "aligned" row a probe cannot build) are NaN as well, and are not counted.
    assert (~result.scored).sum() == 0 or np.isnan(result.scores[~result.scored]).all()
    merged = type(result).merge([result])
    assert merged.nonfinite_scores == result.nonfinite_scores


def test_nonfinite_scores_flag_the_round_and_never_set_the_peak(tokenizer, tmp_path, caplog):
    """A round where only some probes have NaN/inf scores: its metrics over the rest are logged, but it is flagged
    and fed to the peak tracker as NaN; here the -inf answers inflate the rest, so unflagged it would be the peak."""
    poisoned = {8, 10, 12}
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=14)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=2, engine="batched", variants=("context",),
                                       monitor="counterfactual_probability")
    trainer.add_callback(callback)
    nan_token, columns = _poison_for(tokenizer, callback.scorer)
    poison = PoisonLogits(nan_token, columns, active=lambda: trainer.state.global_step in poisoned)
    model.register_forward_hook(poison, with_kwargs=True)
    with caplog.at_level(logging.WARNING, logger="ctx_callback"):
        trainer.train()

    assert trainer.state.global_step == 14
    rows = {row["step"]: row for row in trainer.state.log_history if CF_PROB in row}
    assert sorted(rows) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert [row["step"] for row in trainer.state.log_history if "loss" in row] == list(range(1, 15))
    for step, row in rows.items():
        if step in poisoned:
            assert row[FAILED] == 1.0 and row[NONFINITE] == 2 + len(columns)  # Egypt's 2 NaN + 4 x -inf
            assert math.isfinite(row[CF_PROB])  # logged for diagnosis, over the finite scores
        else:
            assert FAILED not in row and row[NONFINITE] == 0.0
        assert row[PEAK_STEP] not in poisoned
    # Unflagged, a poisoned round would have been the best value of the run.
    best_clean = max(row[CF_PROB] for step, row in rows.items() if step not in poisoned)
    assert max(rows[s][CF_PROB] for s in poisoned) > best_clean
    assert callback.peak_tracker.peak_step not in poisoned
    assert callback.summary()["peak_step"] not in poisoned
    flagged = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(flagged) == len(poisoned) and "6 probe score(s) at step 8" in flagged[0]


# ----------------------------------------------------------------------------------------------------------------
# 3. A tracker integration raises while the callback logs its row
# ----------------------------------------------------------------------------------------------------------------


class BrokenTracker(TrainerCallback):
    """A tracker (added before the callback, as report_to trackers are) that fails on every ctx_reliance row."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if any(key.startswith("ctx_reliance/") for key in logs):
            raise ConnectionError("tracker server unreachable")
        self.seen.append(dict(logs))


def test_a_tracker_that_raises_on_our_row_does_not_stop_training(tokenizer, tmp_path, caplog):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=4)
    tracker = BrokenTracker()
    trainer.add_callback(tracker)
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=2, variants=("context",)))
    with caplog.at_level(logging.WARNING, logger="ctx_callback"):
        trainer.train()

    assert trainer.state.global_step == 4
    history = trainer.state.log_history
    # Nothing is lost: our rows are in log_history (Trainer.log appends before calling on_log) ...
    assert [row["step"] for row in history if CF_PROB in row] == [0, 2, 4]
    # ... and the Trainer's own loss rows, including those of the probe steps, were logged and reached the tracker.
    assert [row["step"] for row in history if "loss" in row] == [1, 2, 3, 4]
    assert [row["loss"] for row in tracker.seen if "loss" in row] == [row["loss"] for row in history if "loss" in row]
    warnings = [r.getMessage() for r in caplog.records if "tracker" in r.getMessage()]
    assert len(warnings) == 1  # once per run, with the tracker's error
    assert "ConnectionError: tracker server unreachable" in warnings[0]
    assert "state.log_history" in warnings[0]


def test_strict_mode_reraises_a_tracker_error(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=1)
    trainer.add_callback(BrokenTracker())
    trainer.add_callback(ContextRelianceCallback(trainer, PROBES[:2], eval_steps=1, strict=True,
                                                 variants=("context",)))
    with pytest.raises(ConnectionError, match="unreachable"):
        trainer.train()


# ----------------------------------------------------------------------------------------------------------------
# 4. 10,000 probes
# ----------------------------------------------------------------------------------------------------------------


class CountingTokenizer:
    """Forwards everything to the real tokenizer and counts the calls that tokenize or render text."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls = 0
        self.template_calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.template_calls += 1
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __len__(self):
        return len(self._tokenizer)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class ForwardShapes:
    """A forward pre-hook that checks every forward pass against the budget, in constant memory (so that it does not
    show up in the memory measured around it). The prefix engine's passes are told apart by their arguments: the
    preamble has no cache, the tail pass keeps one logit, the answer pass a boolean mask."""

    def __init__(self, max_batch_tokens: int, max_batch_size: int):
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.counts = {"preamble": 0, "tail": 0, "answer": 0, "rows": 0}
        self.largest = dict.fromkeys(self.counts, 0)  # the largest rows x width per kind of pass
        self.violations: list[tuple[str, int, int]] = []

    def __call__(self, module, args, kwargs):
        rows, width = _input_ids(args, kwargs).shape
        has_cache = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if not has_cache:
            kind = "preamble" if isinstance(kwargs.get("logits_to_keep"), int) else "rows"
        else:
            kind = "tail" if isinstance(kwargs.get("logits_to_keep"), int) else "answer"
        self.counts[kind] += 1
        self.largest[kind] = max(self.largest[kind], rows * width)
        # Every pass within the budget. The tail pass of B items uses at most half of it (the batcher counts each
        # item as its 2 answer rows); the preamble is a single row.
        tokens, row_limit = self.max_batch_tokens, self.max_batch_size
        if kind == "tail":
            tokens, row_limit = tokens // 2, row_limit // 2
        if rows * width > tokens or rows > row_limit or (kind == "preamble" and rows != 1):
            self.violations.append((kind, rows, width))


SHORT_ANSWERS = [("Lyon", "Paris"), ("Milan", "Rome"), ("Munich", "Berlin"), ("Osaka", "Tokyo"), ("Toronto", "Ottawa")]


def synthetic_probes(n: int):
    """``n`` probes whose contexts have 0 to 8 filler sentences, so prompt lengths vary (about 40 to 100 tokens)."""
    records = []
    for i in range(n):
        fake, true = SHORT_ANSWERS[i % len(SHORT_ANSWERS)]
        records.append({
            "id": f"synthetic/{i}", "family": f"family{i % 4}",
            "context": f"Report {i}. " + "Some background on the region. " * (i % 9)
            + f"The capital of Land{i} is {fake}.",
            "question": f"What is the capital of Land{i}?", "counterfactual_answer": fake, "parametric_answer": true,
        })
    return probes_from_records(records)


def _settled_rss(process) -> int:
    """RSS once freed memory is handed back: glibc keeps freed blocks (a round's 48 MB logits, say) in its arenas and
    returns them to the OS at its own pace, which moved the RSS between two rounds by -46 to +92 MB with the same code
    (measured). ``malloc_trim(0)`` returns them now, so the RSS counts what a round kept, not what the allocator cached.
    Where glibc is not the allocator, the plain RSS."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
    return process.memory_info().rss


def _mb(n_bytes: float) -> float:
    return n_bytes / 2**20


@pytest.mark.slow
def test_ten_thousand_probes_encoded_once_bounded_memory_and_batches(tokenizer):
    import psutil

    n, max_batch_tokens, max_batch_size = 10_000, 4096, 256
    template = "Answer from the passage.\n\nPassage: {context}\nQuestion: {question}\nAnswer:"
    probes = synthetic_probes(n)
    model = make_tiny_llama(tokenizer)
    ProbeScorer(probes[:8], tokenizer, template, variants=("context",)).score_raw(model)  # imports, lazy caches
    counting = CountingTokenizer(tokenizer)
    process = psutil.Process()

    tracemalloc.start()
    started = time.perf_counter()
    base = tracemalloc.get_traced_memory()[0]
    scorer = ProbeScorer(probes, counting, template, variants=("context",), max_batch_tokens=max_batch_tokens,
                         max_batch_size=max_batch_size)
    encoded_mb = _mb(tracemalloc.get_traced_memory()[0] - base)
    encode_seconds = time.perf_counter() - started
    tokenizer_calls = counting.calls
    assert len(scorer.encoded.items) == n
    assert n <= tokenizer_calls <= 4 * n  # the prompt and two answers per probe (a fourth call at a merged boundary)
    assert scorer.active_engine == "prefix"

    shapes = ForwardShapes(max_batch_tokens, max_batch_size)
    handle = model.register_forward_pre_hook(shapes, with_kwargs=True)
    after, peaks, rss, seconds = [], [], [], []
    try:
        for _ in range(3):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            started = time.perf_counter()
            result = scorer.score_raw(model)
            seconds.append(time.perf_counter() - started)
            current, peak = tracemalloc.get_traced_memory()
            after.append(current)
            peaks.append(_mb(peak - before))
            assert np.isfinite(result.scores).all() and result.scores.shape == (n, 1, 2)
            del result
            rss.append(_settled_rss(process))
    finally:
        handle.remove()
        tracemalloc.stop()

    growth_kb = [(after[i] - after[i - 1]) / 1024 for i in (1, 2)]
    rss_growth_mb = _mb(rss[2] - rss[0])
    report = (f"{n} probes: encoded in {encode_seconds:.1f}s with {tokenizer_calls} tokenizer calls, "
              f"{encoded_mb:.1f} MB traced after encoding ({encoded_mb * 2**20 / n:.0f} B/probe); rounds "
              f"{', '.join(f'{s:.1f}s' for s in seconds)}; traced growth per round after the first "
              f"{growth_kb[0]:.1f} KB, {growth_kb[1]:.1f} KB; transient traced peak per round "
              f"{', '.join(f'{p:.2f} MB' for p in peaks)}; RSS {_mb(rss[0]):.0f} MB after round 1, "
              f"growth over rounds 2-3 {rss_growth_mb:+.1f} MB; forward passes per round "
              f"{ {k: v // 3 for k, v in shapes.counts.items()} }, largest rows x width {shapes.largest}")
    print(report)

    # Encoded once: the rounds made no tokenizer call (and a template string format renders no chat template).
    assert counting.calls == tokenizer_calls and counting.template_calls == 0, report
    # Memory: a round keeps nothing. Anything kept per probe would cost at least 8 bytes x 10,000 = 78 KB per round;
    # the measured growth is a few KB (allocator free lists, torch's argument caches), so 64 KB per round separates
    # the two.
    assert all(g < 64 for g in growth_kb), report
    # The transient Python memory of a round (the per-item result list, the score table) is small next to the
    # encoding. Tensors are not traced by tracemalloc: RSS bounds them (no growth beyond allocator noise; one batch's
    # vocabulary-sized logits alone are 256 x 49152 x 4 B = 48 MB).
    assert max(peaks) < 0.5 * encoded_mb, report
    assert rss_growth_mb < 64, report
    # Every forward pass within the budget (see ForwardShapes), and the preamble once per round.
    assert not shapes.violations, (shapes.violations[:5], report)
    assert shapes.counts["preamble"] == 3 and shapes.counts["rows"] == 0, report
    assert shapes.counts["tail"] == shapes.counts["answer"] > 0, report
