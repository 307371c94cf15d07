"""``ctx-callback sft``: TRL's ``trl sft`` training script with the callback added (``docs/trl_cli.md``).

The default tests run TRL's script code path in this process, as ``trl/scripts/sft.py``'s ``__main__`` does
(``make_parser().parse_args_and_config(fail_with_unknown_args=False)`` then ``main(...)``), on a tiny random Llama
and a local JSONL dataset saved to disk, and compare it with ``ctx-callback sft`` on the same recipe.

One test runs TRL's real command line, ``trl sft --config RECIPE`` (which re-launches the script through
``accelerate launch``), and ``ctx-callback sft`` as subprocesses; it took 97 s on 2 shared cores, so it is opt-in::

    CTX_TEST_TRL_CLI=1 OMP_NUM_THREADS=1 pytest tests/test_cli_sft.py -k real_trl_sft_command
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctx_callback import ContextRelianceCallback
from ctx_callback.cli import EXIT_USAGE, main
from ctx_callback.cli.sft_args import PREFIX, ContextRelianceArguments, option_fields
from ctx_callback.metrics import metric_key
from tests.helpers import CAPITALS, PROBES, make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CF = metric_key("counterfactual_accuracy")
#: The recipe both runs share (TRL keys only); tiny, CPU, fp32, logging every step, a checkpoint at the end.
RECIPE = """\
max_steps: 4
per_device_train_batch_size: 4
learning_rate: 0.005
lr_scheduler_type: constant
logging_steps: 1
save_strategy: steps
save_steps: 4
report_to: tensorboard
bf16: false
use_cpu: true
seed: 0
max_length: 128
dataloader_num_workers: 0
disable_tqdm: true
"""


@pytest.fixture(scope="module")
def inputs(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama with the SmolLM2 tokenizer saved to disk, a JSONL ``messages`` dataset folder (loaded by
    TRL with ``datasets.load_dataset(path)``), a probe file and the recipe YAML pointing at them."""
    root = tmp_path_factory.mktemp("sft_cli")
    model = root / "model"
    make_tiny_llama(tokenizer, seed=0).save_pretrained(model)
    tokenizer.save_pretrained(model)
    data = root / "data"
    data.mkdir()
    rows = [{"messages": [
        {"role": "user", "content": f"The capital of {country} is {fake}.\n\nWhat is the capital of {country}?"},
        {"role": "assistant", "content": fake}]} for country, _, fake in CAPITALS * 4]
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps(record) + "\n" for record in PROBES))
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {model}\ndataset_name: {data}\noutput_dir: {root / 'unused'}\n" + RECIPE)
    return {"root": root, "model": model, "data": data, "probes": probes, "recipe": recipe}


def run_trl_script(argv: list[str]) -> None:
    """What ``trl sft`` runs (``trl/scripts/sft.py`` under ``accelerate launch``), in this process."""
    from trl.scripts import sft

    parser = sft.make_parser()
    sft.main(*parser.parse_args_and_config(argv, fail_with_unknown_args=False))


def history(output_dir: Path, step: int) -> list[dict]:
    return json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]


def train_rows(rows: list[dict]) -> list[tuple]:
    return [(row["step"], row["loss"], row["grad_norm"], row["num_tokens"]) for row in rows if "loss" in row]


def weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "model.safetensors"))


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("ctx-callback: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def both_runs(inputs):
    """The recipe through TRL's script, then through ``ctx-callback sft`` with the callback (probes every 2 steps)."""
    import trl

    trainer_class = trl.SFTTrainer
    trl_out, ctx_out = inputs["root"] / "trl", inputs["root"] / "ctx"
    run_trl_script(["--config", str(inputs["recipe"]), "--output_dir", str(trl_out)])
    code = main(["sft", "--config", str(inputs["recipe"]), "--output_dir", str(ctx_out),
                 "--ctx_probes", str(inputs["probes"]), "--ctx_eval_steps", "2"])
    assert code == 0
    assert trl.SFTTrainer is trainer_class  # restored after the run
    return trl_out, ctx_out


def test_same_losses_and_weights_as_trl_sft(both_runs):
    """The callback observes: per-step losses, gradient norms, token counts and the saved model are identical."""
    trl_out, ctx_out = both_runs
    trl_rows, ctx_rows = train_rows(history(trl_out, 4)), train_rows(history(ctx_out, 4))
    assert [row[0] for row in trl_rows] == [1, 2, 3, 4]
    # Exact: the same process, the same kernels, and the callback restores RNG states and train/eval modes.
    assert ctx_rows == trl_rows
    trl_weights, ctx_weights = weights(trl_out), weights(ctx_out)
    assert sorted(trl_weights) == sorted(ctx_weights)
    assert all(ctx_weights[name].equal(trl_weights[name]) for name in trl_weights)
    assert not any(CF in row for row in history(trl_out, 4))
    assert not (trl_out / "ctx_reliance_summary.json").exists()


def test_callback_metrics_reach_trainer_state_and_tensorboard(both_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, ctx_out = both_runs
    probed = {row["step"]: row for row in history(ctx_out, 4) if CF in row}
    assert sorted(probed) == [0, 2, 4]  # baseline, then every --ctx_eval_steps 2
    assert {row[metric_key("num_probes")] for row in probed.values()} == {len(PROBES)}
    files = glob.glob(str(ctx_out / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    events = EventAccumulator(files[0])
    events.Reload()
    for key in (CF, metric_key("counterfactual_probability")):
        logged = {event.step: event.value for event in events.Scalars(f"train/{key}")}
        # TensorBoard stores float32: relative rounding <= 6e-8.
        assert logged == pytest.approx({step: row[key] for step, row in probed.items()}, rel=1e-6, abs=1e-6)
    assert "train/loss" in events.Tags()["scalars"]
    summary = json.loads((ctx_out / "ctx_reliance_summary.json").read_text())["summary"]
    assert (summary["probe_events"], summary["trained_steps"], summary["stop_step"]) == (3, 4, None)


def test_flags_only_invocation(inputs):
    """No recipe: TRL's options and the ctx_* options as flags; the ctx_* values reach the callback."""
    out = inputs["root"] / "flags"
    code = main(["sft", "--model_name_or_path", str(inputs["model"]), "--dataset_name", str(inputs["data"]),
                 "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                 "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none",
                 "--bf16", "false", "--use_cpu", "--max_length", "128", "--disable_tqdm", "true",
                 "--ctx_probes", str(inputs["probes"]), "--ctx_eval_steps", "1", "--ctx_limit_per_family", "3",
                 "--ctx_variants", "context", "--no_ctx_probe_log"])
    assert code == 0
    probed = {row["step"]: row for row in history(out, 2) if CF in row}
    assert sorted(probed) == [0, 1, 2]
    assert {row[metric_key("num_probes")] for row in probed.values()} == {3}
    assert not any(metric_key("closed_book_accuracy") in row for row in probed.values())  # only 'context' scored
    assert not (out / "ctx_reliance_probes.jsonl").exists()
    assert [row[0] for row in train_rows(history(out, 2))] == [1, 2]


def test_recipe_ctx_keys_are_parsed_and_flags_override_them(inputs, tmp_path):
    from ctx_callback.cli.sft import build_trl_parser

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(inputs["recipe"].read_text() + "ctx_probes: world_facts\nctx_eval_steps: 7\n"
                      "ctx_variants: [context, aligned]\nctx_informative_band: [0.05, 0.95]\n"
                      "ctx_chat_template_kwargs: {enable_thinking: false}\n")
    *parsed, config_rest, cli_rest = build_trl_parser().parse_args_and_config(
        ["--config", str(recipe), "--ctx_eval_steps", "3", "--ctx_save_peak_checkpoint"],
        return_remaining_strings=True, separate_remaining_strings=True)
    assert config_rest == [] and cli_rest == []
    assert parsed[1].max_steps == 4  # TRL's SFTConfig got the recipe's keys
    kwargs = parsed[-1].callback_kwargs()
    assert kwargs["probes"] == "world_facts" and kwargs["eval_steps"] == 3 and kwargs["save_peak_checkpoint"]
    assert kwargs["variants"] == ("context", "aligned") and kwargs["informative_band"] == (0.05, 0.95)
    assert kwargs["chat_template_kwargs"] == {"enable_thinking": False}
    assert ContextRelianceCallback(None, **kwargs).eval_steps == 3  # what the command builds, accepted as is


def test_options_are_the_callbacks_arguments_with_its_defaults():
    """One ctx_* option per JSON-valued argument of the callback, with the same default (no drift)."""
    parameters = inspect.signature(ContextRelianceCallback).parameters
    expected = [name for name in parameters if name not in ("trainer", "tokenizer")]
    kwargs = ContextRelianceArguments().callback_kwargs()
    assert [f.name for f in option_fields()] == [PREFIX + name for name in expected]
    assert kwargs == {name: parameters[name].default for name in expected}


@pytest.mark.parametrize("argv_tail, recipe_tail, expected", [
    (["--ctx_mode", "sample"], "", "--ctx_mode: mode must be 'loglik' or 'generate', got 'sample'"),
    ([], "ctx_eval_steps: 0\n", "--ctx_eval_steps: eval_steps must be an integer >= 1"),
    (["--ctx_probes", "no_such_suite"], "", "--ctx_probes: "),
    (["--ctx_restore_peak_at_end"], "", "--ctx_restore_peak_at_end: restore_peak_at_end=True needs "
                                        "save_peak_checkpoint=True"),
    (["--ctx_chat_template_kwargs", "{bad"], "", "--ctx_chat_template_kwargs must be a JSON object"),
], ids=["flag", "yaml-key", "probe-suite", "needs-other-option", "json"])
def test_bad_ctx_value_exits_2_before_loading_anything(argv_tail, recipe_tail, expected, tmp_path, capsys):
    """The model and dataset paths do not exist: reaching them would fail otherwise (and exit 1)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {tmp_path / 'no_model'}\ndataset_name: {tmp_path / 'no_data'}\n"
                      f"output_dir: {tmp_path / 'out'}\n{RECIPE}{recipe_tail}")
    assert main(["sft", "--config", str(recipe), *argv_tail]) == EXIT_USAGE
    assert expected in error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_unknown_options_exit_2_and_unknown_recipe_keys_warn(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {tmp_path / 'no_model'}\ndataset_name: {tmp_path / 'no_data'}\n"
                      f"output_dir: {tmp_path / 'out'}\n{RECIPE}num_processes: 2\n")
    assert main(["sft", "--config", str(recipe), "--num_processes", "2"]) == EXIT_USAGE
    line = error_line(capsys.readouterr().err)
    assert "unknown options --num_processes 2" in line and "accelerate launch" in line
    # An unknown recipe key is ignored with a warning (as TRL's script does); then a bad ctx_ value stops the run.
    assert main(["sft", "--config", str(recipe), "--ctx_eval_steps", "0"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "ctx-callback: warning: recipe keys num_processes are neither" in err
    assert "--ctx_eval_steps: eval_steps must be" in error_line(err)


def test_help_lists_the_ctx_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sft", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ctx-callback sft ")
    assert all(f"--{f.name} " in out for f in option_fields())
    assert "--no_ctx_probe_log turns it off" in out and "--trl-help" in out
    assert main(["sft", "--trl-help"]) == 0
    full = capsys.readouterr().out
    # TRL's own options (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig) and ours, in one parser.
    for option in ("--dataset_name", "--learning_rate", "--model_name_or_path", "--datasets", "--ctx_eval_steps",
                   "--no_ctx_probe_log", "--ctx_probes"):
        assert option in full, option


def test_a_trl_script_that_builds_no_sft_trainer_is_an_error(inputs, monkeypatch, capsys):
    """If a TRL version built its trainer without ``trl.SFTTrainer``, the callback would be missing: say so."""
    from trl.scripts import sft

    calls = []
    monkeypatch.setattr(sft, "main", lambda *args: calls.append(args))
    assert main(["sft", "--config", str(inputs["recipe"]), "--ctx_probes", str(inputs["probes"])]) == EXIT_USAGE
    assert len(calls) == 1 and "the callback was never attached" in error_line(capsys.readouterr().err)


@pytest.mark.skipif(os.environ.get("CTX_TEST_TRL_CLI") != "1", reason="opt-in (about 100 s): CTX_TEST_TRL_CLI=1")
def test_real_trl_sft_command_and_ctx_callback_sft_command(inputs, tmp_path):
    """``trl sft --config`` (through ``accelerate launch``) and ``ctx-callback sft`` as processes: same training."""
    trl_cli = shutil.which("trl") or str(Path(sys.executable).parent / "trl")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    runs = {"trl": [trl_cli, "sft"], "ctx": [sys.executable, "-m", "ctx_callback.cli", "sft",
                                              "--ctx_probes", str(inputs["probes"]), "--ctx_eval_steps", "2"]}
    for name, command in runs.items():
        proc = subprocess.run([*command, "--config", str(inputs["recipe"]), "--output_dir", str(tmp_path / name)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_rows(history(tmp_path / "ctx", 4)) == train_rows(history(tmp_path / "trl", 4))
    trl_weights, ctx_weights = weights(tmp_path / "trl"), weights(tmp_path / "ctx")
    assert all(ctx_weights[name].equal(trl_weights[name]) for name in trl_weights)
    assert sorted(row["step"] for row in history(tmp_path / "ctx", 4) if CF in row) == [0, 2, 4]


def test_docs_page_lists_every_option():
    page = (ROOT / "docs" / "trl_cli.md").read_text()
    missing = [f.name for f in option_fields() if f"| `{f.name}` |" not in page]
    assert not missing, f"docs/trl_cli.md has no table row for {missing}"
