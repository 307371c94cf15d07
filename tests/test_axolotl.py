"""The axolotl plugin driven by axolotl itself: ``axolotl train cfg.yml`` on CPU with a tiny local Llama, axolotl's
own config validation of the ``ctx_reliance_*`` keys, and the trainer axolotl builds (page ``docs/axolotl.md``).

Needs axolotl, which is not a project dependency (CI skips this file). axolotl 0.19.0 pins transformers 5.16.1,
trl 1.9.0, peft 0.20.0, accelerate 1.13.0 and datasets 4.8.4, and its full dependency list pulls GPU packages
(xformers, flash-linear-attention, liger-kernel, vllm extras...), so it gets its own virtual environment with the
dependencies its import, config and CPU training path need (measured: each one below was missing at import)::

    python3 -m venv /tmp/axo-venv
    /tmp/axo-venv/bin/pip install torch==2.13.0
    /tmp/axo-venv/bin/pip install --no-deps axolotl==0.19.0 axolotl-contribs-lgpl==0.0.7 \\
        axolotl-contribs-mit==0.0.6 bitsandbytes==0.50.2 triton
    /tmp/axo-venv/bin/pip install transformers==5.16.1 trl==1.9.0 peft==0.20.0 accelerate==1.13.0 \\
        datasets==4.8.4 tokenizers==0.23.1 huggingface_hub==1.17.0 pydantic==2.12.5 PyYAML==6.0.3 packaging==26.0 \\
        addict fire requests einops colorama typer==0.25.1 scipy tensorboard python-dotenv==1.0.1 numpy \\
        sentencepiece posthog==6.7.11 "numba>=0.63.1,<1.0" fastcore evaluate==0.4.1 wandb pytest
    /tmp/axo-venv/bin/pip install --no-deps -e .

and, from the repository root::

    PATH=/tmp/axo-venv/bin:$PATH OMP_NUM_THREADS=1 /tmp/axo-venv/bin/python -m pytest tests/test_axolotl.py -q \\
        -p no:cacheprovider

(``axolotl train`` starts ``accelerate launch``, which it finds on ``PATH``; the test puts the interpreter's folder
first on the subprocess's ``PATH`` itself.) The SmolLM2 tokenizer comes from the ``smollm2_dir`` fixture's cache
(``tests/conftest.py``). About 100 s on 2 shared cores (measured in a fresh venv built as above).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("axolotl")

from pydantic import ValidationError  # noqa: E402

from ctx_callback import ContextRelianceCallback, ProbeScorer, load_probes  # noqa: E402
from tests.helpers import CAPITALS, METRIC_ATOL, make_tiny_llama  # noqa: E402

PLUGIN = "ctx_callback.integrations.axolotl.ContextReliancePlugin"
COUNTERFACTUAL = "ctx_reliance/counterfactual_accuracy"
MAX_STEPS, EVAL_STEPS = 6, 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer, probes_file) -> Path:
    """A tiny Llama + the SmolLM2 tokenizer saved as a local checkpoint, and a chat dataset in JSONL."""
    root = tmp_path_factory.mktemp("axolotl")
    model = make_tiny_llama(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "data.jsonl", "w", encoding="utf-8") as f:
        for _ in range(4):
            for country, _true, fake in CAPITALS:
                f.write(json.dumps({"messages": [
                    {"role": "user", "content": f"The capital of {country} is {fake}.\n\nWhat is the capital of "
                                                f"{country}?"},
                    {"role": "assistant", "content": fake},
                ]}) + "\n")
    return root


def write_config(workdir: Path, name: str, probes_file: Path, **overrides) -> Path:
    """An axolotl YAML as a user writes it: local model and data, CPU precision, the plugin and its keys."""
    cfg = {
        "base_model": str(workdir / "model"),
        "datasets": [{"path": str(workdir / "data.jsonl"), "ds_type": "json", "type": "chat_template"}],
        "chat_template": "tokenizer_default",
        "chat_template_kwargs": {"enable_thinking": False},
        "dataset_prepared_path": str(workdir / "prepared"),
        "val_set_size": 0,
        "output_dir": str(workdir / name),
        "sequence_len": 128, "sample_packing": False,
        "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": MAX_STEPS, "num_epochs": 1,
        "optimizer": "adamw_torch", "lr_scheduler": "constant", "learning_rate": 5e-3,
        "bf16": False, "fp16": False, "tf32": False,
        "logging_steps": 1, "save_steps": MAX_STEPS, "use_tensorboard": True, "seed": 0,
        "plugins": [PLUGIN],
        "ctx_reliance_probes": str(probes_file),
        "ctx_reliance_eval_steps": EVAL_STEPS,
    }
    cfg.update(overrides)
    path = workdir / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run_cli(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return subprocess.run([str(Path(sys.executable).parent / "axolotl"), "train", str(config)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def test_axolotl_train_logs_reliance_rows_and_leaves_training_unchanged(workdir, probes_file, tokenizer):
    import torch
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    config = write_config(workdir, "cli_run", probes_file)
    proc = run_cli(config, workdir)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    out = workdir / "cli_run"
    history = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())["log_history"]
    rows = {row["step"]: row for row in history if COUNTERFACTUAL in row}
    assert sorted(rows) == [0, EVAL_STEPS, MAX_STEPS]
    assert not [row for row in history if "ctx_reliance/probe_failed" in row]
    # the Trainer's own loss rows are all there (the callback's rows did not replace them)
    assert sorted(row["step"] for row in history if "loss" in row) == list(range(1, MAX_STEPS + 1))

    # the baseline row is the untrained checkpoint's score, rendered with the tokenizer's chat template
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    expected = ProbeScorer(load_probes(str(probes_file)), tokenizer, "chat").score(model).metrics
    for key, value in expected.items():
        assert rows[0][key] == pytest.approx(value, abs=METRIC_ATOL), key

    files = glob.glob(str(out / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event file under {out / 'runs'}"
    scalars = {}
    for path in files:
        acc = EventAccumulator(path)
        acc.Reload()
        if f"train/{COUNTERFACTUAL}" in acc.Tags()["scalars"]:
            scalars.update({e.step: e.value for e in acc.Scalars(f"train/{COUNTERFACTUAL}")})
    assert scalars == pytest.approx({step: row[COUNTERFACTUAL] for step, row in rows.items()}, rel=1e-6)
    summary = json.loads((out / "ctx_reliance_summary.json").read_text())
    assert summary and (out / "ctx_reliance_probes.jsonl").exists()

    # an observer: the same run without the plugin has the same losses and bit-identical final weights
    plain = write_config(workdir, "cli_plain", probes_file)
    cfg = yaml.safe_load(plain.read_text())
    for key in [key for key in cfg if key.startswith("ctx_reliance_")] + ["plugins"]:
        del cfg[key]
    plain.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    proc = run_cli(plain, workdir)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    plain_history = json.loads((workdir / "cli_plain" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    assert [row["loss"] for row in plain_history["log_history"] if "loss" in row] == [
        row["loss"] for row in history if "loss" in row]
    with_plugin, without = load_file(out / "model.safetensors"), load_file(workdir / "cli_plain" / "model.safetensors")
    assert with_plugin.keys() == without.keys()
    assert all(torch.equal(with_plugin[name], without[name]) for name in with_plugin)


def test_the_trainer_axolotl_builds_carries_the_callback(workdir, probes_file):
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import setup_model_and_trainer

    config = write_config(workdir, "built", probes_file, ctx_reliance_patience=2, ctx_reliance_warmup_steps=3,
                          ctx_reliance_informative_band=[0.05, 0.95])
    cfg = load_cfg(str(config))
    trainer, _model, tokenizer, _peft, _processor = setup_model_and_trainer(cfg, load_datasets(cfg=cfg))
    ours = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ContextRelianceCallback)]
    assert len(ours) == 1
    callback = ours[0]
    assert callback.trainer is trainer
    assert (callback.eval_steps, callback.informative_band) == (EVAL_STEPS, (0.05, 0.95))
    assert (callback.peak_tracker.patience, len(callback.probes)) == (2, len(CAPITALS))
    # probes are rendered like the training data: with axolotl's tokenizer (its chat template) and its
    # chat_template_kwargs
    assert callback.scorer.tokenizer is tokenizer is trainer.processing_class
    assert callback.scorer.prompt_format.kind == "chat"
    assert dict(callback.scorer.prompt_format.chat_template_kwargs) == dict(cfg.chat_template_kwargs) == {
        "enable_thinking": False}


@pytest.mark.parametrize("overrides, fragments", [
    ({"ctx_reliance_eval_step": 50}, ["did you mean 'ctx_reliance_eval_steps'"]),
    ({"ctx_reliance_eval_steps": "fifty"}, ["ctx_reliance_eval_steps", "valid integer"]),
    ({"ctx_reliance_mode": "fast"}, ["mode must be 'loglik' or 'generate'", "got 'fast'"]),
    ({"ctx_reliance_restore_peak_at_end": True}, ["needs save_peak_checkpoint=True"]),
])
def test_a_bad_key_or_value_fails_at_axolotls_config_validation(workdir, probes_file, overrides, fragments):
    from axolotl.cli.config import load_cfg

    # a base model that does not exist: validation must fail before anything tries to load one
    config = write_config(workdir, "bad", probes_file, base_model=str(workdir / "no-such-model"), **overrides)
    with pytest.raises(ValidationError) as info:
        load_cfg(str(config))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_axolotl_train_stops_on_a_bad_value_with_the_message(workdir, probes_file):
    config = write_config(workdir, "bad_cli", probes_file, ctx_reliance_mode="fast")
    proc = run_cli(config, workdir)
    assert proc.returncode != 0
    assert "mode must be 'loglik' or 'generate', got 'fast'" in proc.stdout + proc.stderr
    assert not (workdir / "bad_cli").exists() or not list((workdir / "bad_cli").glob("checkpoint-*"))
