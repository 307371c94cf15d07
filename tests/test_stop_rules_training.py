"""Stop rules, uncertainty, the paired comparison and per-probe flips in real tiny SFT runs.

The runs train a tiny random Llama on the rise-then-fall conflict data (tests.helpers) and probe 42 probes: the 7
capital-city conflicts asked in 6 phrasings, so that a paired test has enough probes to mean something.
"""

from __future__ import annotations

import glob
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctx_callback import ContextRelianceCallback
from ctx_callback.cli import main as cli_main
from ctx_callback.decisions import ProbeEvent, first_stop, make_stop_rules
from ctx_callback.errors import ConfigurationError
from ctx_callback.outcomes import PROBES_FILE, read_probe_rows
from ctx_callback.peak import PeakTracker
from tests.helpers import CAPITALS, StopAt, make_tiny_llama, make_trainer

ROOT = Path(__file__).resolve().parent.parent
CF_PROB = "ctx_reliance/counterfactual_probability"
QUESTIONS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}.",
             "What city is {c}'s capital?", "Tell me the capital of {c}.", "{c} has which capital?"]
PHRASED_PROBES = [
    {"id": f"capitals/{country.lower()}-{q}", "family": "capitals", "context": f"The capital of {country} is {fake}.",
     "question": question.format(c=country), "counterfactual_answer": fake, "parametric_answer": true}
    for q, question in enumerate(QUESTIONS) for country, true, fake in CAPITALS
]
# min_decline 0.1: a fall large enough that some probes flip to the memorised answer before the stop.
# sustained_events=1: these tests are about the one-event rule (tests/test_sustained_decline.py: the default 2).
RULE_OPTIONS = dict(eval_steps=2, monitor="counterfactual_probability", stop_rule="significant_decline",
                    min_decline=0.1, warmup_steps=4, variants=("context",), verbose=False, sustained_events=1)


def run(tokenizer, output_dir, *, extra_callbacks=(), max_steps=40, resume=None, trainer_kwargs=None, **options):
    model = make_tiny_llama(tokenizer)
    trainer = make_trainer(model, tokenizer, output_dir, max_steps=max_steps, **(trainer_kwargs or {}))
    callback = ContextRelianceCallback(trainer, PHRASED_PROBES, **{**RULE_OPTIONS, **options})
    trainer.add_callback(callback)
    for extra in extra_callbacks:
        trainer.add_callback(extra)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def probe_rows_of(trainer):
    return [r for r in trainer.state.log_history if CF_PROB in r]


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def replay_from_probe_log(path, **rule_options):
    """The stop step the rules take on the per-probe outcomes written to the jsonl, computed independently."""
    rows = read_probe_rows(path)
    steps = sorted({r["step"] for r in rows})
    rules = make_stop_rules(**rule_options)
    for step in steps:
        at = sorted((r for r in rows if r["step"] == step), key=lambda r: r["id"])
        outcomes = sigmoid(np.array([r["cf"] - r["par"] for r in at]))
        decision, _ = first_stop(rules, ProbeEvent(step, float(outcomes.mean()), outcomes))
        if decision is not None:
            return step, decision
    return None, None


@pytest.fixture(scope="module")
def tracked(tokenizer, tmp_path_factory):
    """The uninterrupted significant_decline run, reporting to TensorBoard and W&B (offline) at once."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("significant")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(root))
    mp.setenv("WANDB_PROJECT", "ctx_callback_test")
    mp.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.teardown()  # settings cached by an earlier run in this process would send this run elsewhere
    try:
        trainer, callback = run(tokenizer, root / "out", trainer_kwargs=dict(report_to=["tensorboard", "wandb"]))
        import wandb

        wandb.finish()
        wandb.teardown()  # wandb keeps its settings (WANDB_DIR) per process: a later run must read them afresh
    finally:
        mp.undo()
    return root, trainer, callback


def test_significant_decline_stops_a_real_run_where_the_rule_says(tracked):
    root, trainer, callback = tracked
    rows = {r["step"]: r for r in probe_rows_of(trainer)}
    stop, peak = callback.stop_step, callback.peak_tracker.peak_step
    assert stop is not None and trainer.state.global_step == stop < 30, "the run must fall for this test to mean much"
    assert callback.stop_rule_name == "significant_decline"
    assert rows[stop]["ctx_reliance/early_stop"] == 1.0
    # The stop step is the one the rule takes on the outcomes in the probe log (rounded log-probs, computed apart).
    step, decision = replay_from_probe_log(root / "out" / PROBES_FILE, stop_rule="significant_decline", warmup=4,
                                           min_decline=0.1, sustained_events=1)
    assert step == stop
    # The logged comparison: a decline of at least min_decline, its interval around it, a tiny p-value.
    row = rows[stop]
    assert row["ctx_reliance/decline_from_peak"] == pytest.approx(rows[peak][CF_PROB] - row[CF_PROB])
    assert row["ctx_reliance/decline_from_peak"] >= 0.1
    assert row["ctx_reliance/decline_ci_low"] < row["ctx_reliance/decline_from_peak"] < row[
        "ctx_reliance/decline_ci_high"]
    # The replay reads log-probs rounded to 5 decimals (each outcome moves by up to 2.5e-6); near p = 1e-6 (t about
    # 7) that moves p by about 1e-5 relative (seen on an AVX2 CPU). rel=1e-3 allows for it and still tells another
    # test statistic apart (the sign and Wilcoxon tests' p-values differ from the t-test's by orders of magnitude).
    assert row["ctx_reliance/decline_p_value"] == pytest.approx(decision.p_value, rel=1e-3)
    assert row["ctx_reliance/decline_p_value"] < 0.05 / (len(rows) * (len(rows) - 1) / 2)
    # No earlier event after the warm-up met both conditions.
    for s, r in rows.items():
        if 4 <= s < stop and r["ctx_reliance/decline_from_peak"] >= 0.1:
            assert r["ctx_reliance/decline_p_value"] >= 0.05 / 3
    # The message states the decline, its interval and the p-value; the summary carries them.
    for text in ("declined", "interval of the decline", "paired t-test p =", f"step {peak}"):
        assert text in callback.stop_reason
    summary = json.loads((root / "out" / "ctx_reliance_summary.json").read_text())["summary"]
    assert summary["stop_rule"] == "significant_decline" and summary["stop_step"] == stop
    assert summary["final_decline_p_value"] == row["ctx_reliance/decline_p_value"]
    assert summary["final_interval"] == [row[CF_PROB + "_ci_low"], row[CF_PROB + "_ci_high"]]


def test_every_event_logs_intervals_around_the_value(tracked):
    _, trainer, _ = tracked
    for row in probe_rows_of(trainer):
        for key in (CF_PROB, "ctx_reliance/counterfactual_accuracy", "ctx_reliance/parametric_accuracy"):
            low, high, se = row[key + "_ci_low"], row[key + "_ci_high"], row[key + "_se"]
            assert low <= row[key] <= high and se >= 0, (row["step"], key)
        # Wilson for accuracies: within [0, 1] and never degenerate at 0 or 1.
        acc = row["ctx_reliance/counterfactual_accuracy"]
        n = row["ctx_reliance/num_probes"]
        assert row["ctx_reliance/counterfactual_accuracy_se"] == pytest.approx(math.sqrt(acc * (1 - acc) / n))
        assert 0.0 <= row["ctx_reliance/counterfactual_accuracy_ci_low"] < row[
            "ctx_reliance/counterfactual_accuracy_ci_high"] <= 1.0
        assert "ctx_reliance/closed_book_accuracy_se" not in row  # not scored: no interval


def test_probe_log_has_one_row_per_probe_per_event_and_flips_match_the_metrics(tracked):
    root, trainer, callback = tracked
    path = root / "out" / PROBES_FILE
    rows = read_probe_rows(path)
    events = [r["step"] for r in probe_rows_of(trainer)]
    assert len(rows) == len(events) * len(PHRASED_PROBES)
    assert sorted({(r["step"], r["id"]) for r in rows}) == sorted((s, p["id"]) for s in events for p in PHRASED_PROBES)
    by_step = {r["step"]: r for r in probe_rows_of(trainer)}
    for step in events:  # the log's per-probe numbers give the logged metric
        at = [r for r in rows if r["step"] == step]
        p_cf = np.mean(sigmoid(np.array([r["cf"] - r["par"] for r in at])))
        assert p_cf == pytest.approx(by_step[step][CF_PROB], abs=1e-5)
        assert sum(r["preferred"] == "context" for r in at) / len(at) == pytest.approx(
            by_step[step]["ctx_reliance/counterfactual_accuracy"])
    # `ctx-callback flips --json` from the peak (the summary's) to the end equals the logged flip counts.
    peak, last = callback.peak_tracker.peak_step, events[-1]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["flips", str(root / "out"), "--json"]) == 0
    report = json.loads(out.getvalue())
    assert (report["from_step"], report["to_step"]) == (peak, last)
    assert report["to_memory"] == by_step[last]["ctx_reliance/flips_to_memory"]
    assert report["to_context"] == by_step[last]["ctx_reliance/flips_to_context"]
    assert report["to_memory"] > 0, "the run must flip probes for this test to mean much"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["flips", str(root / "out"), "--from", "0", "--to", str(peak)]) == 0
    assert "context -> memory" in out.getvalue() and "capitals" in out.getvalue()
    # From the baseline to the peak: the net change of preferred answers is the change of counterfactual accuracy.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["flips", str(root / "out"), "--from", "0", "--to", str(peak), "--json"]) == 0
    rise = json.loads(out.getvalue())
    gained = by_step[peak]["ctx_reliance/counterfactual_accuracy"] - by_step[0]["ctx_reliance/counterfactual_accuracy"]
    assert rise["to_context"] - rise["to_memory"] == round(gained * len(PHRASED_PROBES)) > 0
    assert cli_main(["flips", str(root / "out"), "--from", "1"]) == 2  # no event at step 1


def test_flip_tables_reach_tensorboard_and_wandb_incrementally(tracked):
    root, trainer, _ = tracked
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = {r["step"]: r for r in probe_rows_of(trainer)}
    flip_steps = [s for s, r in rows.items() if r.get("ctx_reliance/flips_to_memory", 0) > 0]
    assert flip_steps
    (events_file,) = glob.glob(str(root / "out" / "runs" / "*" / "events.out.tfevents.*"))
    acc = EventAccumulator(events_file, size_guidance={"tensors": 0})
    acc.Reload()
    tag = "ctx_reliance/flips_since_peak/text_summary"
    assert tag in acc.Tags()["tensors"]
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}
    assert min(texts) == min(flip_steps)
    sent = [line for text in texts.values() for line in text.splitlines()[2:]]
    assert len(sent) == len(set(sent))  # incremental: a flip is sent once per peak
    # W&B: an incremental table, each log adding only the new rows.
    (run_file,) = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    from tests.test_trackers import read_wandb_history

    table = "ctx_reliance/flips_since_peak/"  # W&B flattens the logged table's fields into nested keys
    logged = [r for r in read_wandb_history(run_file) if table + "_type" in r]
    assert len(logged) == len(texts)  # one W&B log per event with new flips, as TensorBoard
    assert all(r[table + "_type"] == "incremental-table-file" for r in logged)
    assert [r[table + "increment_num"] for r in logged] == list(range(len(logged)))
    files = sorted(glob.glob(str(root / "wandb" / "offline-run-*" / "files" / "media" / "table" / "ctx_reliance" /
                                 "*.table.json")))
    table_rows = [row for f in files for row in json.load(open(f))["data"]]
    assert len(table_rows) == len(sent)  # each flip once: the incremental files hold only the new rows
    assert sorted(tuple(str(x) for x in r[:3]) for r in table_rows) == sorted(
        tuple(line.strip("| ").split(" | ")[:3]) for line in sent)


def test_resume_after_the_peak_keeps_the_paired_state_and_the_probe_log(tokenizer, tmp_path, tracked):
    _, full, full_cb = tracked
    peak, stop = full_cb.peak_tracker.peak_step, full_cb.stop_step
    # Checkpoint one step after the peak; the interrupted run goes on to probe once more (rows the resume drops).
    out = tmp_path / "resumed"
    first, first_cb = run(tokenizer, out, extra_callbacks=[StopAt(peak + 2)],
                          trainer_kwargs=dict(save_strategy="steps", save_steps=peak + 1))
    assert first.state.global_step == peak + 2 and (out / f"checkpoint-{peak + 1}").is_dir()
    assert max(r["step"] for r in read_probe_rows(out / PROBES_FILE)) == peak + 2
    state = json.loads((out / f"checkpoint-{peak + 1}" / "trainer_state.json").read_text())
    paired = state["stateful_callbacks"]["ctx_callback.ContextRelianceCallback"][CF_PROB]["paired"]
    assert paired["peak"]["step"] == peak and len(paired["peak"]["outcomes"]) == len(PHRASED_PROBES)

    second, second_cb = run(tokenizer, out, resume=str(out / f"checkpoint-{peak + 1}"))
    assert second_cb.stop_step == stop and second_cb.stop_rule_name == "significant_decline"
    assert second_cb.peak_tracker.peak_step == peak
    full_rows = {r["step"]: r for r in probe_rows_of(full)}
    resumed_rows = {r["step"]: r for r in probe_rows_of(second)}
    assert resumed_rows.keys() == full_rows.keys()
    for key in ("ctx_reliance/decline_from_peak", "ctx_reliance/decline_p_value", "ctx_reliance/flips_to_memory"):
        assert resumed_rows[stop][key] == pytest.approx(full_rows[stop][key], rel=1e-4), key
    # One row per probe per event, no duplicates, the same outcomes as the uninterrupted run's.
    rows = read_probe_rows(out / PROBES_FILE)
    keys = [(r["step"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(full_rows) * len(PHRASED_PROBES)
    full_log = {(r["step"], r["id"]): r for r in read_probe_rows(full.args.output_dir + "/" + PROBES_FILE)}
    for r in rows:
        assert r["cf"] == pytest.approx(full_log[(r["step"], r["id"])]["cf"], abs=1e-3)


def test_divergence_and_stopping_thresholds_in_a_real_run(tokenizer, tmp_path, tracked):
    _, full, full_cb = tracked
    curve = [(r["step"], r[CF_PROB]) for r in probe_rows_of(full)]
    tracker = PeakTracker(patience=None)
    peak_value = {}
    for step, value in curve:  # the raw value at the smoothed peak, as the rules take it
        if tracker.update(step, value).is_new_peak:
            current = value
        peak_value[step] = current
    floor = min(v for s, v in curve if s >= 4 and s > full_cb.peak_tracker.peak_step) + 1e-3
    options = dict(stop_rule=None, divergence_threshold=0.03, stopping_threshold=floor)
    trainer, callback = run(tokenizer, tmp_path / "thresholds", **options)
    logged = [(r["step"], r[CF_PROB]) for r in probe_rows_of(trainer)]
    expected = None
    for step, value in logged:
        if step >= 4 and (peak_value[step] - value >= 0.03 or value < floor):
            expected = (step, "divergence_threshold" if peak_value[step] - value >= 0.03 else "stopping_threshold")
            break
    assert expected is not None
    assert (callback.stop_step, callback.stop_rule_name) == expected
    assert trainer.state.global_step == callback.stop_step


def test_bad_configuration_errors_name_the_argument(tokenizer, tmp_path):
    trainer = make_trainer(make_tiny_llama(tokenizer), tokenizer, tmp_path, max_steps=1)
    cases = [
        (dict(stop_rule="decline"), "stop_rule must be None or one of"),
        (dict(stop_rule="significant_decline", alpha=0.0), "alpha must be a number in \\(0, 1\\)"),
        (dict(stop_rule="significant_decline", min_decline=-1), "min_decline must be a finite number >= 0"),
        (dict(divergence_threshold=-0.1), "divergence_threshold must be None or a finite number > 0"),
        (dict(stopping_threshold=float("nan")), "stopping_threshold must be None or a finite number"),
        (dict(mode="generate", monitor="memorization_ratio", stop_rule="significant_decline"),
         "needs per-probe outcomes of the monitored metric"),
        (dict(probe_log="yes"), "probe_log must be True or False"),
        (dict(informative_band=(0.9, 0.1)), "informative_band must be None or \\(low, high\\)"),
        (dict(informative_band=(0.1, 0.9), mode="generate"), "informative_band needs mode='loglik'"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigurationError, match=match):
            ContextRelianceCallback(trainer, PHRASED_PROBES, **kwargs)


def test_informative_band_keeps_probes_off_the_ceiling_and_the_floor(tokenizer, tmp_path):
    trainer, callback = run(tokenizer, tmp_path / "band", max_steps=2, stop_rule=None, informative_band=(0.2, 0.8))
    rows = read_probe_rows(tmp_path / "band" / PROBES_FILE)
    baseline = [r for r in rows if r["step"] == 0]
    kept = len(callback.active_indices)
    assert 0 < kept < len(PHRASED_PROBES), "the band must cut something for this test to mean much"
    assert len(baseline) == kept and callback.known_counts["capitals"] == {"kept": kept, "total": len(PHRASED_PROBES)}
    p_cf = sigmoid(np.array([r["cf"] - r["par"] for r in baseline]))
    assert ((p_cf >= 0.2 - 1e-4) & (p_cf <= 0.8 + 1e-4)).all()
    assert probe_rows_of(trainer)[0]["ctx_reliance/num_probes"] == kept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_decides_identically(tmp_path, smollm2_dir):
    """Two ranks take the same decisions; with ``sustained_events=2`` the streak (and each event's qualification, the
    one-event rule's test) is computed on the merged outcomes too."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "workers" / "ddp_stop_rules.py"),
           str(smollm2_dir), str(tmp_path), "2"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"two-process run timed out (hang?):\n{(err.stderr or b'')[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["stop_step"] is not None, "the run must stop for this test to mean much"
    for key in ("stop_step", "stop_rule", "stop_reason", "global_step", "peak_step"):
        assert ranks[0][key] == ranks[1][key], key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "ctx_reliance/probe_seconds"} for r in rows]  # noqa: E731
    assert strip(ranks[0]["rows"]) == strip(ranks[1]["rows"])
    assert all(r["ctx_reliance/num_probes"] == len(PHRASED_PROBES) for r in ranks[0]["rows"])
    # Only the main process wrote the probe log: one row per probe per event.
    rows = read_probe_rows(tmp_path / "run" / PROBES_FILE)
    assert len(rows) == len(ranks[0]["rows"]) * len(PHRASED_PROBES)
    # The p-value of the stop is the one the merged per-probe outcomes give.
    step, decision = replay_from_probe_log(tmp_path / "run" / PROBES_FILE, stop_rule="significant_decline", warmup=4,
                                           sustained_events=2)
    assert step == ranks[0]["stop_step"]
    assert "at 2 consecutive events" in ranks[0]["stop_reason"]


def test_scan_reports_intervals_and_the_plot_draws_the_band(tokenizer, tmp_path, tracked):
    """``ctx-callback scan`` carries the intervals of a checkpoint; the plot draws the monitored metric's band."""
    import contextlib
    import io

    from ctx_callback.plotting import plot_reliance

    _, full, full_cb = tracked
    out = tmp_path / "scan"
    run(tokenizer, out, max_steps=4, stop_rule=None, trainer_kwargs=dict(save_strategy="steps", save_steps=4))
    probes_file = tmp_path / "probes.jsonl"
    probes_file.write_text("".join(json.dumps(p) + "\n" for p in PHRASED_PROBES))
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["scan", str(out), "--probes", str(probes_file), "--device", "cpu", "--variants", "context",
                         "--monitor", "counterfactual_probability"]) == 0
    (row,) = json.loads((out / "ctx_reliance_scan.json").read_text())["rows"]
    assert row["step"] == 4
    intervals = row["intervals"]
    logged = {r["step"]: r for r in trainer_rows_at(out)}[4]
    for key in (CF_PROB, "ctx_reliance/counterfactual_accuracy"):
        for suffix in ("_se", "_ci_low", "_ci_high"):  # the checkpoint's scan equals what the callback logged
            assert intervals[key + suffix] == pytest.approx(logged[key + suffix], abs=1e-5), key + suffix
    from ctx_callback.cli import scan_to_log_history

    (entry,) = [r for r in scan_to_log_history(json.loads((out / "ctx_reliance_scan.json").read_text()))
                if CF_PROB in r]
    assert entry[CF_PROB + "_ci_low"] == intervals[CF_PROB + "_ci_low"]  # `ctx-callback plot` of a scan: a band too
    # The band: the same history with and without the interval keys gives different pictures.
    history = full.state.log_history
    stripped = [{k: v for k, v in r.items() if not k.endswith(("_ci_low", "_ci_high"))} for r in history]
    with_band = plot_reliance(history, tmp_path / "band.png", monitor_key=CF_PROB)
    without = plot_reliance(stripped, tmp_path / "plain.png", monitor_key=CF_PROB)
    assert Path(with_band).read_bytes() != Path(without).read_bytes()


def trainer_rows_at(output_dir):
    state = json.loads((Path(output_dir) / "checkpoint-4" / "trainer_state.json").read_text())
    return [r for r in state["log_history"] if CF_PROB in r]
