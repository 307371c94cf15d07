"""End-to-end tests of the ``ctx-callback`` command line: real tiny training runs, checkpoints and subprocesses."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctx_callback import ProbeScorer, load_probes
from ctx_callback.cli import SCAN_CSV, SCAN_JSON, main
from tests.helpers import METRIC_ATOL, PROBES, make_tiny_llama, make_trainer

REPO = Path(__file__).resolve().parents[1]
MONITOR = "ctx_reliance/counterfactual_probability"  # the scan's default monitor in loglik mode
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m ctx_callback.cli ARGS`` in a subprocess (one thread, offline, CPU): the real entry point."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ctx_callback.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``ctx_callback.cli.main(ARGS)`` in this process, with its stdout, stderr and exit code as :func:`cli` gives
    them (the entry point itself is exercised by :func:`cli`; this saves a Python start-up per call)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse: --help and usage errors
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(["ctx-callback", *map(str, args)], code, out.getvalue(), err.getvalue())


def png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def assert_close(a: dict, b: dict, keys=None, tol: float = METRIC_ATOL) -> None:
    """Metrics of the same weights scored in two processes (the command line runs with one thread, this process and
    the training run with two, which may split the reductions differently): equal up to float summation order."""
    keys = sorted(a) if keys is None else keys
    assert keys
    for key in keys:
        x, y = a[key], b[key]
        if math.isnan(x) or math.isnan(y):
            assert math.isnan(x) and math.isnan(y), key
        else:
            assert abs(x - y) <= tol, (key, x, y)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: one full-model run with the callback, one LoRA run, each scanned once
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tokenizer, tmp_path_factory) -> Path:
    """6 SFT steps of a tiny Llama with the callback probing every 2 steps; checkpoints at steps 2, 4, 6."""
    from ctx_callback import ContextRelianceCallback

    out = tmp_path_factory.mktemp("full_run")
    model = make_tiny_llama(tokenizer, seed=0)
    trainer = make_trainer(model, tokenizer, out, max_steps=6, save_strategy="steps", save_steps=2,
                           learning_rate=2e-2)
    trainer.add_callback(ContextRelianceCallback(trainer, probes=PROBES, eval_steps=2))
    trainer.train()
    trainer.save_state()  # OUTPUT_DIR/trainer_state.json, with the callback's rows
    for step in (2, 4, 6):
        # SFTTrainer saves the tokenizer into every checkpoint: scan relies on it by default.
        assert (out / f"checkpoint-{step}" / "tokenizer_config.json").is_file()
    return out


@pytest.fixture(scope="module")
def full_scan(full_run, probes_file):
    result = cli("scan", full_run, "--probes", probes_file, "--device", "cpu")
    return result


@pytest.fixture(scope="module")
def lora_run(tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    """A LoRA run on a saved tiny base model; tokenizer files removed from the checkpoints (base fallback)."""
    import peft
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora_run")
    base_dir, out = root / "base", root / "out"
    make_tiny_llama(tokenizer, seed=1).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)  # so PEFT records base_dir as the base model
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(model, tokenizer, out, max_steps=4, save_strategy="steps", save_steps=2,
                           learning_rate=5e-2, peft_config=config)
    trainer.train()
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / "adapter_model.safetensors").is_file()
        assert read_json(ckpt / "adapter_config.json")["base_model_name_or_path"] == str(base_dir)
        for name in TOKENIZER_FILES:
            (ckpt / name).unlink(missing_ok=True)
    return base_dir, out


# ----------------------------------------------------------------------------------------------------------------
# scan
# ----------------------------------------------------------------------------------------------------------------


def test_scan_prints_table_progress_and_peak(full_run, full_scan):
    assert full_scan.returncode == 0, full_scan.stderr
    out, err = full_scan.stdout, full_scan.stderr
    for index, step in enumerate((2, 4, 6), start=1):
        assert re.search(rf"^\s*{step}\*?\s+checkpoint-{step}\s+\|", out, re.MULTILINE), out
        assert re.search(rf"^\[{index}/3\] checkpoint-{step} \.\.\. \d+\.\d+s$", err, re.MULTILINE), err
    assert "capitals" in out and "Traceback" not in err
    data = read_json(full_run / SCAN_JSON)
    rows = data["rows"]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(r["kind"] == "full" for r in rows)
    values = [r["metrics"][MONITOR] for r in rows]
    best = rows[max(range(len(values)), key=lambda i: (values[i], -i))]  # argmax, first on ties
    assert data["peak"]["checkpoint"] == best["checkpoint"]
    assert data["peak"]["value"] == best["metrics"][MONITOR]
    peak_line = next(line for line in out.splitlines() if line.startswith("peak "))
    assert f"at {best['checkpoint']} (step {best['step']})" in peak_line
    assert re.search(rf"^\s*{best['step']}\* checkpoint-{best['step']}", out, re.MULTILINE)


def test_scan_csv_and_json_agree(full_run, full_scan):
    assert full_scan.returncode == 0, full_scan.stderr
    data = read_json(full_run / SCAN_JSON)
    with open(full_run / SCAN_CSV, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in csv_rows] == [r["checkpoint"] for r in data["rows"]]
    for csv_row, json_row in zip(csv_rows, data["rows"]):
        assert int(csv_row["step"]) == json_row["step"]
        assert int(csv_row["is_peak"]) == (json_row["checkpoint"] == data["peak"]["checkpoint"])
        metric_columns = [c for c in csv_row if c.startswith("ctx_reliance/")]
        assert set(metric_columns) == set(json_row["metrics"])
        assert "ctx_reliance/capitals/counterfactual_accuracy" in metric_columns
        for column in metric_columns:
            x, y = float(csv_row[column]), json_row["metrics"][column]
            # Exact: the same float written twice, as repr() in the CSV (which round-trips) and in the JSON.
            assert x == y or (math.isnan(x) and math.isnan(y)), column


def test_scan_matches_in_process_scorer_and_callback(full_run, full_scan, probes_file, tokenizer):
    from transformers import AutoModelForCausalLM

    assert full_scan.returncode == 0, full_scan.stderr
    data = read_json(full_run / SCAN_JSON)
    by_step = {r["step"]: r["metrics"] for r in data["rows"]}
    model = AutoModelForCausalLM.from_pretrained(full_run / "checkpoint-4", dtype=torch.float32).eval()
    scorer = ProbeScorer(load_probes(str(probes_file)), tokenizer, "chat")
    expected = scorer.score(model).metrics
    assert set(expected) == set(by_step[4])
    assert_close(expected, by_step[4])
    # The callback scored the same weights during training: the scan reproduces its logged rows.
    history = read_json(full_run / "trainer_state.json")["log_history"]
    for step, metrics in by_step.items():
        logged = next(r for r in history if r.get("step") == step and MONITOR in r)
        assert_close(logged, metrics, keys=sorted(metrics))
    # Training moved the model: the checkpoints do not all score the same.
    margins = [m["ctx_reliance/logprob_margin"] for m in by_step.values()]
    assert len(set(margins)) == 3


def test_rescan_skips_cached_checkpoints(full_run, full_scan, probes_file):
    assert full_scan.returncode == 0, full_scan.stderr
    before_json = (full_run / SCAN_JSON).read_bytes()
    before_csv = (full_run / SCAN_CSV).read_bytes()
    again = run_cli("scan", full_run, "--probes", probes_file, "--device", "cpu")
    assert again.returncode == 0, again.stderr
    # Nothing is scored again, so the files and the table are byte for byte the first run's (no float recomputed).
    assert again.stderr.count("... cached") == 3
    assert "scored 0, cached 3" in again.stderr
    assert (full_run / SCAN_JSON).read_bytes() == before_json
    assert (full_run / SCAN_CSV).read_bytes() == before_csv
    assert again.stdout == full_scan.stdout


def test_scan_results_dir_and_different_settings(full_run, full_scan, probes_file, tmp_path):
    """Other probe settings are another fingerprint (scored afresh); --output-dir moves the files."""
    assert full_scan.returncode == 0, full_scan.stderr
    result = run_cli("scan", full_run, "--probes", probes_file, "--device", "cpu", "--output-dir", tmp_path,
                 "--variants", "context", "--limit-per-family", "3", "--prompt-format", "plain")
    assert result.returncode == 0, result.stderr
    assert "... cached" not in result.stderr and "scored 3, cached 0" in result.stderr
    data = read_json(tmp_path / SCAN_JSON)
    assert data["settings"]["variants"] == ["context"] and data["settings"]["num_probes"] == 3
    assert data["fingerprint"] != read_json(full_run / SCAN_JSON)["fingerprint"]
    assert all("ctx_reliance/closed_book_accuracy" not in r["metrics"] for r in data["rows"])
    assert (tmp_path / SCAN_CSV).is_file()


def test_broken_checkpoint_is_skipped_and_retried(full_run, probes_file, tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        shutil.copytree(full_run / f"checkpoint-{step}", run / f"checkpoint-{step}",
                        ignore=shutil.ignore_patterns("optimizer.pt"))
    weights = run / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(b"this is not a safetensors file" * 10)

    first = run_cli("scan", run, "--probes", probes_file, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    warnings = [line for line in first.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "skipping checkpoint-4" in warnings[0], first.stderr
    assert "Traceback" not in first.stderr
    assert "[2/3] checkpoint-4 ... failed" in first.stderr
    data = read_json(run / SCAN_JSON)
    assert [r["step"] for r in data["rows"]] == [2, 6]
    assert not re.search(r"^\s*4\*?\s+checkpoint-4", first.stdout, re.MULTILINE)

    # Not recorded as scored: the next run retries it (and only it).
    second = run_cli("scan", run, "--probes", probes_file, "--device", "cpu")
    assert second.returncode == 0
    assert second.stderr.count("... cached") == 2 and "[2/3] checkpoint-4 ... failed" in second.stderr

    # Repaired: scored now, with the same numbers as the original checkpoint.
    shutil.copy2(full_run / "checkpoint-4" / "model.safetensors", weights)
    third = run_cli("scan", run, "--probes", probes_file, "--device", "cpu")
    assert third.returncode == 0, third.stderr
    assert re.search(r"^\[2/3\] checkpoint-4 \.\.\. \d+\.\d+s$", third.stderr, re.MULTILINE)
    rows = read_json(run / SCAN_JSON)["rows"]
    assert [r["step"] for r in rows] == [2, 4, 6]
    original = {r["step"]: r["metrics"] for r in read_json(full_run / SCAN_JSON)["rows"]}
    assert_close(original[4], rows[1]["metrics"])


def test_scan_lora_checkpoints(lora_run, probes_file, tokenizer):
    import peft
    from transformers import AutoModelForCausalLM

    base_dir, out = lora_run
    result = run_cli("scan", out, "--probes", probes_file, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    data = read_json(out / SCAN_JSON)
    assert [(r["step"], r["kind"]) for r in data["rows"]] == [(2, "peft"), (4, "peft")]
    assert data["settings"]["tokenizer"] == str(base_dir)  # no tokenizer in the checkpoints: the base's
    # checkpoint-4 was scored after checkpoint-2's adapter was swapped out: compare with a fresh load.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out / "checkpoint-4").eval()
    expected = ProbeScorer(load_probes(str(probes_file)), tokenizer, "chat").score(model).metrics
    metrics = {r["step"]: r["metrics"] for r in data["rows"]}
    assert_close(expected, metrics[4])
    assert metrics[2]["ctx_reliance/logprob_margin"] != metrics[4]["ctx_reliance/logprob_margin"]


# ----------------------------------------------------------------------------------------------------------------
# Errors and exit codes
# ----------------------------------------------------------------------------------------------------------------


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ctx-callback: error: ") and "Traceback" not in stderr
    return lines[0]


def test_missing_directory_exits_2(tmp_path):
    result = run_cli("scan", tmp_path / "nope")
    assert result.returncode == 2
    assert "no such directory" in _one_line_error(result.stderr)


def test_directory_without_checkpoints_exits_2(tmp_path, capsys):
    (tmp_path / "checkpoint-final").mkdir()  # not a numbered checkpoint
    (tmp_path / "checkpoint-3").write_text("a file, not a checkpoint directory")
    assert main(["scan", str(tmp_path)]) == 2
    assert "no checkpoint-* directories" in _one_line_error(capsys.readouterr().err)


def test_unknown_probe_suite_exits_2(full_run):
    result = run_cli("scan", full_run, "--probes", "no_such_suite")
    assert result.returncode == 2
    assert "Unknown probe suite 'no_such_suite'" in _one_line_error(result.stderr)
    assert not (full_run / "ctx_reliance_scan.json.tmp").exists()


def test_bad_input_exit_codes_in_process(full_run, tmp_path, capsys):
    bad_probes = tmp_path / "bad.jsonl"
    bad_probes.write_text('{"context": "x", "question": "y"}\n')
    assert main(["scan", str(full_run), "--probes", str(bad_probes)]) == 2
    assert "line 1" in _one_line_error(capsys.readouterr().err)
    assert main(["scan", str(full_run), "--monitor", "no_such_metric"]) == 2
    assert "--monitor" in _one_line_error(capsys.readouterr().err)
    # A checkpoint without tokenizer files and no PEFT base: the user is told to pass --tokenizer.
    bare = tmp_path / "bare" / "checkpoint-1"
    bare.mkdir(parents=True)
    shutil.copy2(full_run / "checkpoint-2" / "config.json", bare)
    shutil.copy2(full_run / "checkpoint-2" / "model.safetensors", bare)
    assert main(["scan", str(bare.parent), "--probes", "world_facts"]) == 2
    assert "--tokenizer" in _one_line_error(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:  # argparse usage errors
        main(["scan", str(full_run), "--variants", "context,nonsense"])
    assert exc.value.code == 2
    assert "unknown variant" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in _one_line_error(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------------------------


def test_plot_trainer_state_and_output_dir(full_run, tmp_path):
    target = tmp_path / "curve.png"
    result = run_cli("plot", full_run / "trainer_state.json", "--output", target, "--width", "6", "--height", "4",
                 "--dpi", "50")
    assert result.returncode == 0, result.stderr
    assert png_size(target) == (300, 200)
    assert main(["plot", str(full_run)]) == 0  # OUTPUT_DIR: its trainer_state.json, PNG inside it
    assert png_size(full_run / "ctx_reliance.png") == (800, 450)  # plot_reliance defaults: 8 x 4.5 in at 100 dpi


def test_plot_scan_results(full_run, full_scan, tmp_path, capsys):
    assert full_scan.returncode == 0, full_scan.stderr
    scan_copy = tmp_path / "results.json"
    shutil.copy2(full_run / SCAN_JSON, scan_copy)
    assert main(["plot", str(scan_copy)]) == 0
    assert "scan results" in capsys.readouterr().out
    assert png_size(tmp_path / "ctx_reliance.png") == (800, 450)


def test_plot_output_dir_falls_back_to_checkpoint_then_scan(full_run, full_scan, tmp_path, capsys):
    from ctx_callback.cli import scan_to_log_history

    assert full_scan.returncode == 0, full_scan.stderr
    run = tmp_path / "run"
    shutil.copytree(full_run / "checkpoint-6", run / "checkpoint-6",
                    ignore=shutil.ignore_patterns("*.pt", "*.safetensors"))
    assert main(["plot", str(run), "-o", str(tmp_path / "a.png")]) == 0
    assert "checkpoint-6/trainer_state.json" in capsys.readouterr().out
    # No trainer state with reliance rows anywhere: the scan results are used.
    (run / "checkpoint-6" / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 1, "loss": 2.0}]}))
    assert main(["plot", str(run)]) == 2
    assert "nothing to plot" in _one_line_error(capsys.readouterr().err)
    shutil.copy2(full_run / SCAN_JSON, run / SCAN_JSON)
    assert main(["plot", str(run)]) == 0
    assert png_size(run / "ctx_reliance.png") == (800, 450)
    # Scan rows become log_history rows (with the peak step and the run's losses).
    history = scan_to_log_history(read_json(full_run / SCAN_JSON))
    reliance = [r for r in history if MONITOR in r]
    assert [r["step"] for r in reliance] == [2, 4, 6]
    peak = read_json(full_run / SCAN_JSON)["peak"]["step"]
    assert all(r["ctx_reliance/peak_step"] == peak for r in reliance)
    assert any("loss" in r for r in history)


# ----------------------------------------------------------------------------------------------------------------
# probe, --help
# ----------------------------------------------------------------------------------------------------------------


def test_probe_checkpoint_prints_families(full_run, full_scan, probes_file):
    assert full_scan.returncode == 0, full_scan.stderr
    result = run_cli("probe", full_run / "checkpoint-6", "--probes", probes_file, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = {r["step"]: r["metrics"] for r in read_json(full_run / SCAN_JSON)["rows"]}[6]
    row = next(line for line in result.stdout.splitlines() if line.startswith("capitals "))
    header = result.stdout.splitlines()[0].split()
    cells = dict(zip(header, row.split()))
    assert int(cells["probes"]) == 7
    # The table rounds to 3 decimals (<= 5e-4 off) numbers of another scoring run than the scan's: compare the values,
    # not the strings, which differ when a value within float noise of a rounding boundary rounds the other way.
    for column, key in (("cf", "counterfactual_accuracy"), ("margin", "logprob_margin")):
        assert re.fullmatch(r"-?\d+\.\d{3}", cells[column]), cells
        assert abs(float(cells[column]) - expected[f"ctx_reliance/capitals/{key}"]) <= 5e-4 + METRIC_ATOL, column
    as_json = run_cli("probe", full_run / "checkpoint-6", "--probes", probes_file, "--device", "cpu", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert_close(expected, json.loads(as_json.stdout)["metrics"])


def test_probe_missing_model_exits_2(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "no_model"), "--probes", "world_facts"]) == 2
    assert "no such model directory" in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("command, options", [
    ("scan", ["--probes", "--limit-per-family", "--prompt-format", "--system-prompt", "--mode", "--variants",
              "--monitor", "--dtype", "--device", "--batch-tokens", "--output-dir", "--tokenizer", "exit codes"]),
    ("plot", ["--output", "--width", "--height", "--dpi", "trainer_state.json", "exit codes"]),
    ("probe", ["--probes", "--limit-per-family", "--mode", "--variants", "--dtype", "--device", "--json",
               "exit codes"]),
])
def test_subcommand_help(command, options, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in options:
        assert option in text, option
    assert "(default: " in text


def test_top_level_help_subprocess():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("scan", "plot", "probe", "exit codes"):
        assert command in result.stdout
