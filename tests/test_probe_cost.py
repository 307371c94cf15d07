"""Probe cost (issue 15): ``probe_dtype`` (bf16 autocast probing) and ``controls_every`` (control variants on a slower
clock), in the scorer, the callback and the command line.

Tolerances for bf16 against fp32 (see docs/performance.md, "bf16 probing and control cadence"). bfloat16 keeps 8
significant bits (a relative rounding error up to 2^-9 = 0.2% per rounded value), so the error of a log-probability
grows with the magnitude of the logits it comes from, layer after layer:

- the tiny random Llama (hidden size 32, 2 layers, logits near zero): measured max |delta loglik| 5e-4 nats per answer
  token and max |delta p_cf| 2e-4 per probe; asserted with 10x margin (5e-3, 2e-3);
- SmolLM2-135M (30 layers, logits of tens): measured on 90 built-in probes x 3 variants x 2 answers, max |delta loglik|
  0.26 nats per answer token (mean 0.03), max |delta margin| 0.46 nats, max |delta p_cf| 0.020 per probe, the
  ``counterfactual_probability`` metric within 9e-5 (5.6e-4 on the 7 capital probes), and no preference flipped;
  asserted (on 15 built-in probes, 5 per family): 0.5 nats per token, 0.05 per probe, 0.01 for the metric, and every
  preference whose fp32 margin exceeds 1 nat kept.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ctx_callback import ConfigurationError, ContextRelianceCallback, ProbeScorer, load_probes, probes_from_records
from ctx_callback.scoring import check_probe_dtype_device, cpu_has_native_bf16, resolve_probe_dtype
from tests.helpers import CAPITALS, LOGLIK_ATOL, METRIC_ATOL, StopAt, capital_records, make_tiny_llama, make_trainer

CF_ACC = "ctx_reliance/counterfactual_accuracy"
CONTROL_METRICS = ("closed_book_accuracy", "aligned_accuracy", "context_lift")

#: bf16 against fp32, tiny random Llama (measured: 5e-4 per token, 2e-4 per probe).
TINY_TOL_PER_TOKEN, TINY_TOL_P_CF = 5e-3, 2e-3
#: bf16 against fp32, SmolLM2-135M (measured: 0.26 nats per token, 0.020 per probe, <= 5.6e-4 on the metric).
SMOLLM2_TOL_PER_TOKEN, SMOLLM2_TOL_P_CF, SMOLLM2_TOL_METRIC, SMOLLM2_SAFE_MARGIN = 0.5, 0.05, 0.01, 1.0


def aligned_records():
    """The capital probes with an aligned context each, so that every control metric is finite."""
    aligned = {country: f"The capital of {country} is {true}." for country, true, _ in CAPITALS}
    return [dict(record, aligned_context=aligned[record["question"].split(" of ")[1].rstrip("?")])
            for record in capital_records()]


def control_keys(row):
    return sorted(k for k in row if k.split("/")[-1] in CONTROL_METRICS)


def answer_lengths(scorer):
    """``[probes, variants, 2]`` answer token counts (0 where not encoded)."""
    lengths = np.zeros((len(scorer.probes), len(scorer.variants), 2))
    for item in scorer.encoded.items:
        column = scorer.variants.index(item.variant)
        lengths[item.probe_index, column] = (len(item.counterfactual_ids), len(item.parametric_ids))
    return lengths


def bf16_differences(model, probes, tokenizer):
    """fp32 and bf16 reports, and the largest differences: per answer token, of p_cf per probe, of the metric."""
    variants = ("context", "closed_book", "aligned")
    fp32 = ProbeScorer(probes, tokenizer, variants=variants)
    bf16 = ProbeScorer(probes, tokenizer, variants=variants, probe_dtype="bfloat16")
    a, b = fp32.score(model), bf16.score(model)
    lengths = answer_lengths(fp32)
    delta = np.abs(a.result.scores - b.result.scores)
    assert np.array_equal(np.isnan(a.result.scores), np.isnan(b.result.scores))
    per_token = np.nanmax(delta / np.where(lengths > 0, lengths, np.nan))

    def p_cf(scores):
        return 1.0 / (1.0 + np.exp(-(scores[:, 0, 0] - scores[:, 0, 1])))

    p_cf_delta = float(np.max(np.abs(p_cf(a.result.scores) - p_cf(b.result.scores))))
    key = "ctx_reliance/counterfactual_probability"
    return a, b, float(per_token), p_cf_delta, abs(a.metrics[key] - b.metrics[key])


# ----------------------------------------------------------------------------------------------------------------
# probe_dtype
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["bf16", "float32", "fp16", 16, torch.float32, ""])
def test_probe_dtype_rejects_unknown_values(bad, tokenizer, capital_probes):
    with pytest.raises(ConfigurationError, match="probe_dtype"):
        ProbeScorer(capital_probes, tokenizer, probe_dtype=bad)
    with pytest.raises(ConfigurationError, match="probe_dtype"):
        ContextRelianceCallback(None, capital_records(), tokenizer=tokenizer, probe_dtype=bad)


def test_probe_dtype_accepts_names_and_torch_dtypes(tokenizer, capital_probes):
    assert resolve_probe_dtype(None) is None
    assert resolve_probe_dtype("bfloat16") == resolve_probe_dtype(torch.bfloat16) == "bfloat16"
    assert ProbeScorer(capital_probes, tokenizer).probe_dtype is None
    callback = ContextRelianceCallback(None, capital_records(), tokenizer=tokenizer, probe_dtype=torch.bfloat16)
    assert callback.probe_dtype == callback.scorer.probe_dtype == "bfloat16"


_BF16_WARNING_SCRIPT = """
import warnings
warnings.simplefilter("always")
import torch
from ctx_callback import ContextRelianceCallback, ProbeScorer, probes_from_records
from ctx_callback.audit import audit_dataset  # noqa: F401  (the audit resolves probe_dtype the same way)
from ctx_callback.scoring import check_probe_dtype_device, cpu_has_native_bf16
from tests.helpers import capital_records
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({tokenizer_dir!r})
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    ContextRelianceCallback(None, capital_records(), tokenizer=tokenizer, probe_dtype="bfloat16")
    ProbeScorer(probes_from_records(capital_records()), tokenizer, probe_dtype="bfloat16")
    check_probe_dtype_device("bfloat16", "cpu")
    check_probe_dtype_device(None, "cpu")
slow = [str(w.message) for w in seen if "without native bfloat16" in str(w.message)]
print(repr((torch.backends.cpu.get_cpu_capability(), cpu_has_native_bf16(), slow)))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about probing on a CPU")
def test_bfloat16_on_a_cpu_without_native_bf16_warns_once_at_construction(smollm2_dir):
    """bf16 autocast is emulated (3-4x slower than fp32) below AVX-512 BF16: one warning, when the callback is built.

    ``ATEN_CPU_CAPABILITY=avx2`` makes torch dispatch as on an AVX2-only CPU, in a fresh process (the capability is
    fixed when torch loads).
    """
    import ast
    import os
    import platform
    import subprocess
    import sys

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("ATEN_CPU_CAPABILITY values are x86 names")
    if str(torch.backends.cpu.get_cpu_capability()) == "DEFAULT":
        pytest.skip("this CPU has no AVX2 kernels to select")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    script = _BF16_WARNING_SCRIPT.format(tokenizer_dir=str(smollm2_dir))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    seen_capability, native, slow = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert seen_capability == "AVX2" and native is False
    assert len(slow) == 1, slow  # once per process, however many parts resolve the dtype
    assert "capability AVX2" in slow[0] and "probe_dtype=None" in slow[0] and "3-4x" in slow[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is about probing on a CPU")
def test_bfloat16_warning_on_a_plain_x86_cpu_names_its_capability(tokenizer, capital_probes, monkeypatch):
    """The same decision for torch's baseline x86 kernels (capability ``DEFAULT``), in this process."""
    import platform

    import ctx_callback.precision as precision

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 capabilities")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr(precision, "_WARNED_SLOW_BF16", set())
    assert cpu_has_native_bf16() is False
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ContextRelianceCallback(None, capital_records(), tokenizer=tokenizer, probe_dtype="bfloat16")
        ProbeScorer(capital_probes, tokenizer, probe_dtype="bfloat16")
        check_probe_dtype_device("bfloat16", "cpu")
        check_probe_dtype_device(None, "cpu")
    slow = [str(w.message) for w in seen if "without native bfloat16" in str(w.message)]
    assert len(slow) == 1, slow
    assert "capability DEFAULT" in slow[0] and "probe_dtype=None" in slow[0] and "3-4x" in slow[0]


def test_bfloat16_on_a_cpu_with_native_bf16_does_not_warn(tokenizer, capital_probes):
    if torch.cuda.is_available() or not cpu_has_native_bf16():
        pytest.skip("needs a CPU with AVX-512 BF16 or AMX, and no CUDA")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProbeScorer(capital_probes, tokenizer, probe_dtype="bfloat16")
        check_probe_dtype_device("bfloat16", "cpu")


def test_float16_is_refused_off_cuda(tokenizer, capital_probes, tiny_model):
    with pytest.raises(ConfigurationError, match="CUDA"):
        check_probe_dtype_device("float16", "cpu")
    check_probe_dtype_device("bfloat16", "cpu")  # fine
    if not torch.cuda.is_available():  # refused at construction
        with pytest.raises(ConfigurationError, match="CUDA"):
            ProbeScorer(capital_probes, tokenizer, probe_dtype="float16")
        with pytest.raises(ConfigurationError, match="CUDA"):
            ContextRelianceCallback(None, capital_records(), tokenizer=tokenizer, probe_dtype="float16")
    else:  # pragma: no cover - CUDA machines: refused when scoring a CPU model
        scorer = ProbeScorer(capital_probes, tokenizer, probe_dtype="float16")
        with pytest.raises(ConfigurationError, match="CUDA"):
            scorer.score_raw(tiny_model)


def test_bf16_autocast_is_active_only_when_asked(tokenizer, capital_probes, tiny_model):
    seen = []

    def hook(module, args, output):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), output.dtype))

    tiny_model.model.layers[0].self_attn.q_proj.register_forward_hook(hook)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}

    ProbeScorer(capital_probes, tokenizer).score_raw(tiny_model)
    assert seen and all(not enabled and dtype == torch.float32 for enabled, _, dtype in seen)

    seen.clear()
    ProbeScorer(capital_probes, tokenizer, probe_dtype="bfloat16").score_raw(tiny_model)
    assert seen and all(enabled and auto == torch.bfloat16 and dtype == torch.bfloat16 for enabled, auto, dtype in seen)
    assert not torch.is_autocast_enabled("cpu")  # left on exit
    for name, value in tiny_model.state_dict().items():  # the weights are not cast, not touched
        assert value.dtype == torch.float32 and torch.equal(value, before[name]), name


@pytest.mark.parametrize("engine", ["prefix", "batched"])
def test_bf16_is_close_to_fp32_on_the_tiny_model(engine, tokenizer, tiny_model):
    probes = probes_from_records(aligned_records())
    fp32 = ProbeScorer(probes, tokenizer, engine=engine)
    bf16 = ProbeScorer(probes, tokenizer, engine=engine, probe_dtype="bfloat16")
    a, b = fp32.score_raw(tiny_model).scores, bf16.score_raw(tiny_model).scores
    assert not np.array_equal(a, b)  # bf16 really ran
    per_token = np.nanmax(np.abs(a - b) / answer_lengths(fp32))
    assert per_token <= TINY_TOL_PER_TOKEN
    _, _, per_token, p_cf_delta, metric_delta = bf16_differences(tiny_model, probes, tokenizer)
    assert per_token <= TINY_TOL_PER_TOKEN and p_cf_delta <= TINY_TOL_P_CF and metric_delta <= TINY_TOL_P_CF


@pytest.mark.slow
def test_bf16_is_close_to_fp32_on_smollm2(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    probes = load_probes("all", limit_per_family=5)
    a, b, per_token, p_cf_delta, metric_delta = bf16_differences(model, probes, tokenizer)
    assert per_token <= SMOLLM2_TOL_PER_TOKEN
    assert p_cf_delta <= SMOLLM2_TOL_P_CF
    assert metric_delta <= SMOLLM2_TOL_METRIC
    margin_a = a.result.scores[..., 0] - a.result.scores[..., 1]
    margin_b = b.result.scores[..., 0] - b.result.scores[..., 1]
    safe = np.abs(margin_a) > SMOLLM2_SAFE_MARGIN  # NaN (not encoded) compares False
    assert safe.sum() > 0.8 * np.isfinite(margin_a).sum()
    assert np.array_equal(margin_a[safe] > 0, margin_b[safe] > 0)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_observer_leaves_weights_bit_identical_with_bf16_probing_and_sparse_controls(tokenizer, tmp_path):
    """As test_callback's observer test, with both new options on: training must not change at all."""

    def run(with_callback):
        model = make_tiny_llama(tokenizer, attention_dropout=0.2)
        trainer = make_trainer(model, tokenizer, tmp_path / str(with_callback), max_steps=6)
        if with_callback:
            trainer.add_callback(ContextRelianceCallback(trainer, aligned_records(), eval_steps=1,
                                                         probe_dtype="bfloat16", controls_every=2))
        trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        return model, losses, trainer

    model_a, losses_a, _ = run(False)
    model_b, losses_b, trainer_b = run(True)
    assert len([row for row in trainer_b.state.log_history if CF_ACC in row]) == 7
    assert losses_a == losses_b
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b), name
    assert model_b.training
    assert not torch.is_autocast_enabled("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Scoring a subset of the variants
# ----------------------------------------------------------------------------------------------------------------


def test_a_context_only_round_skips_the_control_items_and_their_metrics(tokenizer, tiny_model):
    probes = probes_from_records(aligned_records())
    scorer = ProbeScorer(probes, tokenizer)
    rows = []
    tiny_model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    full = scorer.score(tiny_model)
    full_rows, rows[:] = sum(rows), []
    context = scorer.score(tiny_model, variants=("context",))
    assert context.result.variants == ("context",) and context.result.scores.shape == (len(probes), 1, 2)
    assert sum(rows) < full_rows / 2  # the closed-book and aligned items were not run
    assert not control_keys(context.metrics) and control_keys(full.metrics)
    assert all(math.isfinite(v) for v in context.metrics.values())
    # Fewer items per round, so other batches: equal up to float32 summation order (see LOGLIK_ATOL, METRIC_ATOL).
    np.testing.assert_allclose(context.result.scores[:, 0], full.result.scores[:, 0], atol=LOGLIK_ATOL, rtol=0)
    for key, value in context.metrics.items():
        assert value == pytest.approx(full.metrics[key], abs=METRIC_ATOL), key
    assert context.result.nonfinite_scores == 0
    # Variants in any order come back in encoding order; sharded results merge.
    assert scorer.score_raw(tiny_model, [0, 1], variants=("aligned", "context")).variants == ("context", "aligned")


def test_a_round_needs_context_and_encoded_variants(tokenizer, tiny_model, capital_probes):
    scorer = ProbeScorer(capital_probes, tokenizer, variants=("context", "closed_book"))
    with pytest.raises(ConfigurationError, match="'context'"):
        scorer.score_raw(tiny_model, variants=("closed_book",))
    with pytest.raises(ConfigurationError, match="not encoded"):
        scorer.score_raw(tiny_model, variants=("context", "aligned"))


# ----------------------------------------------------------------------------------------------------------------
# controls_every in training
# ----------------------------------------------------------------------------------------------------------------


def controls_run(tokenizer, output_dir, *, extra_callbacks=(), max_steps=10, **callback_kwargs):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, output_dir, max_steps=max_steps, save_strategy="steps", save_steps=4)
    callback = ContextRelianceCallback(trainer, aligned_records(), eval_steps=1, controls_every=3, **callback_kwargs)
    trainer.add_callback(callback)
    for extra in extra_callbacks:
        trainer.add_callback(extra)
    return trainer, callback


def test_controls_every_scores_and_logs_the_controls_on_every_kth_event_only(tokenizer, tmp_path):
    trainer, callback = controls_run(tokenizer, tmp_path, max_steps=7)
    trainer.train()
    rows = [row for row in trainer.state.log_history if CF_ACC in row]
    assert [row["step"] for row in rows] == list(range(8))  # every event has the counterfactual metrics
    with_controls = [row["step"] for row in rows if control_keys(row)]
    assert with_controls == [0, 3, 6]
    expected = sorted(f"ctx_reliance/{family}{metric}" for metric in CONTROL_METRICS
                      for family in ("", "capitals/"))
    for row in rows:
        assert all(math.isfinite(v) for k, v in row.items() if k.startswith("ctx_reliance/")), row["step"]
        assert control_keys(row) == (expected if row["step"] in (0, 3, 6) else [])
    assert callback.probe_events == 8
    # The summary file holds the same rows (no NaN control columns either).
    history = json.loads((tmp_path / "ctx_reliance_summary.json").read_text())["history"]
    assert [r["step"] for r in history if control_keys(r)] == [0, 3, 6]


def test_controls_every_is_resume_safe(tokenizer, tmp_path):
    full, _ = controls_run(tokenizer, tmp_path / "full")
    full.train()
    first, _ = controls_run(tokenizer, tmp_path / "resumed", extra_callbacks=[StopAt(5)])
    first.train()
    assert first.state.global_step == 5
    second, second_cb = controls_run(tokenizer, tmp_path / "resumed")
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-5"))

    def control_steps(trainer):
        return [row["step"] for row in trainer.state.log_history if CF_ACC in row and control_keys(row)]

    assert control_steps(full) == [0, 3, 6, 9]
    assert control_steps(second) == control_steps(full)
    assert second_cb.probe_events == 11
    full_rows = {row["step"]: row for row in full.state.log_history if CF_ACC in row}
    for row in second.state.log_history:
        if CF_ACC in row:
            assert set(row) == set(full_rows[row["step"]]), row["step"]
            for key in control_keys(row):
                assert row[key] == pytest.approx(full_rows[row["step"]][key], abs=1e-5), (row["step"], key)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3", None])
def test_controls_every_rejects_bad_values(bad, tokenizer):
    with pytest.raises(ConfigurationError, match="controls_every"):
        ContextRelianceCallback(None, capital_records(), tokenizer=tokenizer, controls_every=bad)


@pytest.mark.parametrize("monitor", ["closed_book_accuracy", "context_lift", "capitals/aligned_accuracy"])
def test_controls_every_refuses_a_monitor_that_needs_a_control(monitor, tokenizer):
    with pytest.raises(ConfigurationError, match="controls_every"):
        ContextRelianceCallback(None, aligned_records(), tokenizer=tokenizer, controls_every=2, monitor=monitor)
    ContextRelianceCallback(None, aligned_records(), tokenizer=tokenizer, controls_every=1, monitor=monitor)


def test_controls_every_refuses_a_control_metric_for_best_model(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, max_steps=1,
                           metric_for_best_model="ctx_reliance/closed_book_accuracy")
    trainer.add_callback(ContextRelianceCallback(trainer, aligned_records(), controls_every=2))
    with pytest.raises(ConfigurationError, match="metric_for_best_model"):
        trainer.train()


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def test_cli_probe_dtype(tokenizer, tmp_path, probes_file, capsys):
    from ctx_callback.cli import main

    model_dir = tmp_path / "tiny"
    make_tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["probe", str(model_dir), "--probes", str(probes_file), "--device", "cpu", "--json"]

    assert main(common) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert main([*common, "--probe-dtype", "bfloat16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert fp32["probe_dtype"] is None and bf16["probe_dtype"] == "bfloat16"
    assert fp32["metrics"].keys() == bf16["metrics"].keys()
    key = "ctx_reliance/counterfactual_probability"
    assert bf16["metrics"][key] == pytest.approx(fp32["metrics"][key], abs=TINY_TOL_P_CF)

    assert main([*common, "--probe-dtype", "float16"]) == 2
    assert "CUDA" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--probe-dtype", "float32"])  # not a choice: the weights dtype is --dtype
