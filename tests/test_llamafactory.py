"""LLaMA-Factory end to end on CPU: ``examples/llamafactory_sft.py`` runs LLaMA-Factory's own SFT workflow (its
argument parsing, dataset loading and templating, its ``CustomSeq2SeqTrainer``) with the deferred callback.

Opt-in: runs where ``llamafactory`` is importable (CI skips it). LLaMA-Factory 0.9.5 pins ``transformers<=5.6``,
``trl<=0.24`` (this package asks ``trl>=1.0`` but does not import it), so it gets an environment of its own. How it
was run here (torchaudio has no build for torch 2.13 on this machine's index, and torchvision 0.28's operators do
not load; LLaMA-Factory imports torchaudio at module level only to read audio inputs, so an empty stand-in module
is put on the path, and torchvision is removed)::

    python3 -m venv /tmp/lf-venv
    /tmp/lf-venv/bin/pip install torch==2.13.0 llamafactory==0.9.5 pytest
    /tmp/lf-venv/bin/pip uninstall -y torchvision torchaudio
    /tmp/lf-venv/bin/pip install --no-deps -e .
    mkdir -p /tmp/lf-stub/torchaudio && touch /tmp/lf-stub/torchaudio/__init__.py
    PYTHONPATH=/tmp/lf-stub:. /tmp/lf-venv/bin/python -m pytest tests/test_llamafactory.py -q

Measured: 1 passed in about 40 s (2-core Xeon).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llamafactory")

from tests.helpers import CAPITALS, PROBES, make_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "ctx_reliance/counterfactual_probability"


def write_run(tmp_path: Path, tokenizer) -> Path:
    """A tiny Llama, an alpaca-format dataset registered in ``dataset_info.json``, probes, and the YAML."""
    model_dir = tmp_path / "model"
    make_tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [{"instruction": f"What is the capital of {country}?", "input": f"The capital of {country} is {fake}.",
             "output": fake} for country, _, fake in CAPITALS] * 4
    (data_dir / "capitals.json").write_text(json.dumps(rows), encoding="utf-8")
    (data_dir / "dataset_info.json").write_text(json.dumps({"capitals": {"file_name": "capitals.json"}}))
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in PROBES), encoding="utf-8")
    config = {
        "model_name_or_path": str(model_dir), "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "full",
        "dataset": "capitals", "dataset_dir": str(data_dir), "template": "chatml", "cutoff_len": 128,
        "overwrite_cache": True, "preprocessing_num_workers": 1,
        "output_dir": str(tmp_path / "out"), "logging_steps": 1, "save_strategy": "no", "report_to": "tensorboard",
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
        "max_steps": 4, "lr_scheduler_type": "constant", "bf16": False, "use_cpu": True, "seed": 0,
    }
    path = tmp_path / "sft.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path, probes


def test_llamafactory_sft_with_the_deferred_callback(tokenizer, tmp_path):
    config, probes = write_run(tmp_path, tokenizer)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DISABLE_VERSION_CHECK="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(ROOT / "examples" / "llamafactory_sft.py"), str(config),
           "--ctx-probes", str(probes), "--ctx-eval-steps", "2"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    rows = {row["step"]: row for row in state["log_history"] if KEY in row}
    assert sorted(rows) == [0, 2, 4]  # probed at start, every 2 steps, at the end: the callback ran in LF's trainer
    assert all(0.0 <= row[KEY] <= 1.0 for row in rows.values())
    assert rows[4][KEY] != rows[0][KEY]  # the weights moved between the events (lr 5e-3 on copy-the-context data)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars(f"train/{KEY}")}
    assert logged == pytest.approx({step: row[KEY] for step, row in rows.items()}, rel=1e-6, abs=1e-6)
