"""``ctx-callback watch`` (``docs/watch.md``): scoring off the training loop, with a stop that reaches the trainer.

The main fixture runs two real processes on CPU: a tiny training run (``tests/workers/watch_train.py``: the
rise-and-fall SFT run, ``checkpoint-N`` every 2 steps, ``save_total_limit=2``, the in-loop callback observe-only,
and ``StopRequestCallback``) and a watcher subprocess that exits after step 8; the watcher is then restarted in this
test process (a second real process next to the trainer) and runs to its stop, and restarted once more after training
ended. The trainer's ``Pacer`` waits for the watcher at each step after a save, so the outcome does not depend on the
machine's speed.

The test of ``StopRequestCallback`` under two gloo processes (rank 0 reads, every rank stops at the same step) is
opt-in, as it starts two more processes::

    CTX_CALLBACK_WATCH_DDP=1 OMP_NUM_THREADS=1 python -m pytest tests/test_watch.py -k every_rank -p no:cacheprovider
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctx_callback.cli import main
from ctx_callback.reliance_row import KEY_SECONDS, KEY_STOPPED
from ctx_callback.remote_stop import END_FILE, PEAK_FILE, STOP_FILE, write_request
from ctx_callback.watcher import WATCH_FILE
from tests.helpers import METRIC_ATOL, make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "workers" / "watch_train.py"
CF_PROB = "ctx_reliance/counterfactual_probability"
#: The in-loop callback's and the watcher's settings (the worker's callback: eval_steps=2, the same probes).
WATCH_ARGS = ["--variants", "context,closed_book", "--monitor", "counterfactual_probability", "--patience", "2",
              "--warmup-steps", "4", "--poll-interval", "0.1", "--settle-seconds", "0.2"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    return env


def _watch_command(out: Path, probes: Path) -> list[str]:
    return ["watch", str(out), "--probes", str(probes), "--baseline", str(out / "base"),
            "--tensorboard-dir", str(out / "watch_tb"), *WATCH_ARGS]


@pytest.fixture(scope="module")
def watched(tmp_path_factory, tokenizer, smollm2_dir, probes_file):
    """The two-process run; returns what the tests read (module docstring)."""
    import torch

    out = tmp_path_factory.mktemp("watched")
    make_tiny_llama(tokenizer).save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    # A stale request (an earlier run's): StopRequestCallback must ignore it, with a warning.
    write_request(out, STOP_FILE, {"step": 99, "reason": "an earlier run's", "rule": "patience"})
    env = dict(_env(), CTX_TOKENIZER_DIR=str(smollm2_dir))
    start = time.monotonic()
    trainer = subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = subprocess.run([sys.executable, "-m", "ctx_callback.cli", *_watch_command(out, probes_file),
                            "--until-step", "8"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    after_first = json.loads((out / WATCH_FILE).read_text())
    print(f"first watcher done after {time.monotonic() - start:.1f}s")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        second = _run_in_process(_watch_command(out, probes_file))
        print(f"second watcher done after {time.monotonic() - start:.1f}s")
        trainer_output, _ = trainer.communicate(timeout=300)
        print(f"trainer done after {time.monotonic() - start:.1f}s")
        assert trainer.returncode == 0, trainer_output[-3000:]
        third = _run_in_process(_watch_command(out, probes_file) + ["--once"])
    finally:
        torch.set_num_threads(threads)
        if trainer.poll() is None:
            trainer.kill()
    return {"out": out, "trainer_output": trainer_output, "first": first, "second": second, "third": third,
            "after_first": after_first,
            "result": json.loads((out / "result.json").read_text()),
            "state": json.loads((out / WATCH_FILE).read_text()), "seconds": time.monotonic() - start}


def _run_in_process(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    return code, printed.getvalue()


def _tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event in every event file under ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(str(log_dir / "**" / "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def test_watcher_rows_equal_the_in_loop_rows(watched):
    """Same checkpoints, same baseline: the same keys and values (the watcher's own timing key apart), including the
    decision keys after the restart at step 8, which need the replayed decider."""
    in_loop = {row["step"]: row for row in watched["result"]["rows"]}
    events = watched["state"]["events"]
    steps = [e["step"] for e in events]
    assert steps == list(range(0, steps[-1] + 1, 2)) and steps[-1] >= 12, steps
    assert [e["checkpoint"] for e in events[1:]] == [f"checkpoint-{s}" for s in steps[1:]]
    for event in events:
        expected = {k: v for k, v in in_loop[event["step"]].items() if k.startswith("ctx_reliance/")}
        row = event["row"]
        ignored = {KEY_SECONDS, KEY_STOPPED}
        assert set(row) - ignored == set(expected) - ignored, event["step"]
        for key in set(expected) - ignored:
            assert math.isclose(row[key], expected[key], abs_tol=METRIC_ATOL), (event["step"], key)
    # Decisions of the restarted watcher depend on the replayed state: the peak moved after the restart.
    assert watched["after_first"]["events"][-1]["step"] == 8
    assert events[-1]["row"]["ctx_reliance/peak_step"] > 8


def test_rows_reach_tensorboard_once_each_across_restarts(watched):
    events = watched["state"]["events"]
    scalars = _tensorboard_scalars(watched["out"] / "watch_tb")
    logged = scalars[f"train/{CF_PROB}"]
    assert sorted(step for step, _ in logged) == [e["step"] for e in events]  # each step once: no duplicate
    by_step = dict(logged)
    for event in events:
        assert by_step[event["step"]] == pytest.approx(event["row"][CF_PROB], rel=1e-6, abs=1e-6)
    # Two watcher processes wrote rows (two event files); the one restarted after training wrote none.
    files = glob.glob(str(watched["out"] / "watch_tb" / "events.out.tfevents.*"))
    assert len(files) == 2, files
    assert "scored 0" in watched["third"][1] and watched["third"][0] == 0
    assert "scored 0" not in watched["second"][1]
    assert all(e["logged"] for e in events)


def test_stop_request_reaches_the_trainer_and_keeps_the_peak(watched):
    result, state, out = watched["result"], watched["state"], watched["out"]
    stop = state["stop"]
    assert stop is not None and stop["rule"] == "patience"
    assert "stop requested at checkpoint step" in watched["second"][1]
    request = json.loads((out / STOP_FILE).read_text())
    assert request["step"] == stop["step"] == state["events"][-1]["step"]
    # The stale request was ignored; the trainer stopped at the first step after the watcher's request (the Pacer
    # makes "first" exact).
    assert "was there before training began" in watched["trainer_output"]
    assert result["stopped_at_step"] == result["global_step"] == stop["step"] + 1
    assert result["stop_request"]["step"] == stop["step"]
    assert result["global_step"] < 30
    # The peak checkpoint survived save_total_limit=2, a later checkpoint did not: rotation ran, the peak was kept.
    peak = stop["peak_checkpoint"]
    peak_step = int(peak.split("-")[1])
    assert peak_step <= stop["step"] - 4  # patience 2 over checkpoints every 2 steps
    assert result["best_model_checkpoint"] == str(out / peak)
    assert result["checkpoints"] == [peak, f"checkpoint-{stop['step']}"]
    assert json.loads((out / PEAK_FILE).read_text())["peak_checkpoint"] == peak
    assert json.loads((out / END_FILE).read_text())["global_step"] == result["global_step"]
    # The in-loop callback (observe-only) saw the same peak.
    assert result["rows"][-1]["ctx_reliance/peak_step"] == peak_step


def test_partial_checkpoint_is_waited_for_then_scored(tmp_path, tokenizer, probes_file, capsys):
    """A folder with a truncated safetensors and no trainer_state.json is waited for; one with trainer_state.json
    whose weights do not load is retried; both are scored once complete."""
    out = tmp_path / "out"
    model = make_tiny_llama(tokenizer)
    model.save_pretrained(tmp_path / "full")
    tokenizer.save_pretrained(tmp_path / "full")
    weights = (tmp_path / "full" / "model.safetensors").read_bytes()
    ckpt = out / "checkpoint-2"
    ckpt.mkdir(parents=True)
    for name in os.listdir(tmp_path / "full"):
        if name != "model.safetensors":
            (ckpt / name).write_bytes((tmp_path / "full" / name).read_bytes())
    (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 3])  # still being written
    argv = ["watch", str(out), "--probes", str(probes_file), *WATCH_ARGS, "--settle-seconds", "0", "--once"]
    assert main(argv) == 0
    assert "checkpoint-2 is not complete yet" in capsys.readouterr().err
    assert not (out / WATCH_FILE).exists()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))  # state written, weights truncated
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "checkpoint-2: load or score failed" in err and "retrying" in err
    (ckpt / "model.safetensors").write_bytes(weights)
    assert main(argv) == 0
    assert "scored 1" in capsys.readouterr().out
    events = json.loads((out / WATCH_FILE).read_text())["events"]
    assert [e["checkpoint"] for e in events] == ["checkpoint-2"]
    # An abandoned save (no trainer_state.json while a later checkpoint is complete) is skipped, not waited for.
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "model.safetensors").write_bytes(weights[:100])
    later = out / "checkpoint-6"
    later.mkdir()
    for name in os.listdir(ckpt):
        (later / name).write_bytes((ckpt / name).read_bytes())
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipping checkpoint-4" in captured.err and "scored 1" in captured.out
    state = json.loads((out / WATCH_FILE).read_text())
    assert [e["step"] for e in state["events"]] == [2, 6] and list(state["skipped"]) == ["checkpoint-4"]
    # A watcher that died after recording an event and before logging it logs that row on restart, once.
    state["events"][-1]["logged"] = False
    (out / WATCH_FILE).write_text(json.dumps(state))
    assert main(argv + ["--tensorboard-dir", str(tmp_path / "tb")]) == 0
    assert "scored 0" in capsys.readouterr().out
    assert _tensorboard_scalars(tmp_path / "tb")[f"train/{CF_PROB}"] == [
        (6, pytest.approx(state["events"][-1]["row"][CF_PROB], rel=1e-6))]
    assert all(e["logged"] for e in json.loads((out / WATCH_FILE).read_text())["events"])


def _complete_checkpoint(path: Path, model, tokenizer) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": int(path.name.split("-")[1])}))


def test_rows_reach_an_mlflow_run_and_a_wandb_run_given_by_id(tmp_path, tokenizer, probes_file, monkeypatch):
    """The run ids of a training run's trackers: the watcher's rows land in them, read back from their files."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    from tests.test_trackers import read_wandb_history

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("watch_test")).info.run_id
    out = tmp_path / "out"
    _complete_checkpoint(out / "checkpoint-2", make_tiny_llama(tokenizer), tokenizer)
    argv = ["watch", str(out), "--probes", str(probes_file), *WATCH_ARGS, "--settle-seconds", "0", "--once",
            "--mlflow-run-id", run_id, "--mlflow-tracking-uri", uri, "--wandb-run-id", "watchtest1",
            "--wandb-project", "watch_test"]
    assert _run_in_process(argv)[0] == 0
    row = json.loads((out / WATCH_FILE).read_text())["events"][0]["row"]
    history = client.get_metric_history(run_id, CF_PROB)
    assert [(m.step, m.value) for m in history] == [(2, pytest.approx(row[CF_PROB], abs=1e-6))]
    files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-watchtest1.wandb"))
    assert len(files) == 1, files
    logged = [r for r in read_wandb_history(files[0]) if f"train/{CF_PROB}" in r]
    assert [(r["train/global_step"], r[f"train/{CF_PROB}"]) for r in logged] == [
        (2, pytest.approx(row[CF_PROB], abs=1e-6))]


def test_refusals_other_settings_on_restart_bad_stop_options_and_a_stop_on_the_baseline(tmp_path, probes_file,
                                                                                       tokenizer, capsys):
    """Bad input exits 2 with what is wrong: a stop option (the callback's own message), a state file of other
    settings, and a stop rule that fires on the baseline (refused as the callback refuses it; no request written)."""
    out = tmp_path / "out"
    out.mkdir()
    assert main(["watch", str(out), "--probes", str(probes_file), "--patience", "0", "--once"]) == 2
    assert "patience" in capsys.readouterr().err
    base = ["watch", str(out), "--probes", str(probes_file), "--once"]
    assert main(base + ["--patience", "2"]) == 0
    capsys.readouterr()
    (out / WATCH_FILE).write_text(json.dumps({"format": "ctx_callback.watch/1", "fingerprint": "x", "events": []}))
    assert main(base + ["--patience", "3"]) == 2
    assert "other probe or stop settings" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    make_tiny_llama(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    assert main(["watch", str(other), "--probes", str(probes_file), "--baseline", str(tmp_path / "base"),
                 "--stopping-threshold", "0.99", "--once"]) == 2
    assert "fired on the baseline" in capsys.readouterr().err
    assert not (other / STOP_FILE).exists()


def test_stop_request_callback_checks_its_arguments():
    from ctx_callback import ConfigurationError, StopRequestCallback

    with pytest.raises(ConfigurationError, match="check_every must be an integer >= 1"):
        StopRequestCallback(check_every=0)
    with pytest.raises(ConfigurationError, match="protect_peak must be True or False"):
        StopRequestCallback(protect_peak="yes")


@pytest.mark.skipif(os.environ.get("CTX_CALLBACK_WATCH_DDP") != "1",
                    reason="two more processes (about 30 s on 2 shared cores): set CTX_CALLBACK_WATCH_DDP=1")
def test_every_rank_stops_at_the_same_step_and_protects_the_same_peak(tmp_path):
    """Two gloo processes: only rank 0 reads the request files; rank 1, whose folder never gets one, stops at the same
    step and protects the same checkpoint through rank 0's broadcast (``tests/workers/ddp_stop_request.py``)."""
    from tests.test_distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "workers" / "ddp_stop_request.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((tmp_path / "result.json").read_text())
    assert [r["stopped"] for r in ranks] == [4, 4]
    assert [r["best"] for r in ranks] == [os.path.join(r["dir"], "checkpoint-2") for r in ranks]
    assert ranks[1]["request"]["reason"] == "test"
    assert not (tmp_path / "rank1" / STOP_FILE).exists()
