"""The callback's metrics reach real trackers: read back from what TensorBoard, MLflow and W&B write to disk."""

from __future__ import annotations

import glob
import json
import struct

import pytest

from ctx_callback import ContextRelianceCallback
from tests.helpers import PROBES, make_tiny_llama, make_trainer

KEYS = ("ctx_reliance/counterfactual_accuracy", "ctx_reliance/counterfactual_probability",
        "ctx_reliance/capitals/logprob_margin")


def read_wandb_history(path: str) -> list[dict]:
    """History rows of an offline W&B run file (LevelDB-log framing of protobuf ``Record`` messages)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    block, pos, chunk, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            break
        chunk += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.fixture(scope="module")
def tracked_run(tokenizer, tmp_path_factory):
    """One short SFT run reporting to TensorBoard, MLflow (file store) and W&B (offline) at once."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("trackers")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x keeps the file store, in maintenance mode
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "ctx_callback_test")
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(root))
    mp.setenv("WANDB_PROJECT", "ctx_callback_test")
    mp.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.teardown()  # settings cached by an earlier run in this process would send this run elsewhere
    try:
        model = make_tiny_llama(tokenizer)
        trainer = make_trainer(model, tokenizer, root / "out", max_steps=4,
                               report_to=["tensorboard", "mlflow", "wandb"])
        trainer.add_callback(ContextRelianceCallback(trainer, PROBES, eval_steps=2))
        trainer.train()
        import wandb

        wandb.finish()
        wandb.teardown()  # wandb keeps its settings (WANDB_DIR) per process: a later run must read them afresh
    finally:
        mp.undo()
    expected = {row["step"]: row for row in trainer.state.log_history if KEYS[0] in row}
    assert sorted(expected) == [0, 2, 4]
    return root, expected


def test_tensorboard_event_files_hold_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, expected = tracked_run
    # The Trainer's TensorBoard callback writes into output_dir/runs/<date>_<host> by default.
    files = glob.glob(str(root / "out" / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    acc = EventAccumulator(files[0])
    acc.Reload()
    for key in KEYS:
        events = acc.Scalars(f"train/{key}")  # the Trainer's rewrite_logs prefixes non-eval keys with train/
        # The logged values themselves, stored as float32 (relative rounding <= 6e-8): relative and absolute tolerance.
        assert {e.step: e.value for e in events} == pytest.approx({s: r[key] for s, r in expected.items()}, rel=1e-6,
                                                                 abs=1e-6)
    assert "train/loss" in acc.Tags()["scalars"]  # the Trainer's own rows are still there


def test_mlflow_file_store_holds_the_metrics(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, expected = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("ctx_callback_test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    for key in KEYS:
        history = client.get_metric_history(runs[0].info.run_id, key)
        assert {m.step: m.value for m in history} == pytest.approx(
            {s: r[key] for s, r in expected.items()}, abs=1e-6)


def test_wandb_offline_run_holds_the_metrics(tracked_run):
    root, expected = tracked_run
    files = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    rows = read_wandb_history(files[0])
    for key in KEYS:
        logged = {row["train/global_step"]: row[f"train/{key}"] for row in rows if f"train/{key}" in row}
        assert logged == pytest.approx({s: r[key] for s, r in expected.items()}, abs=1e-6)
