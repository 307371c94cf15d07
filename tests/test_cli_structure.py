"""The ``ctx-callback`` package layout: the command registry, and the CLI reading the core instead of copying it.

Guards against drift between the command line and the core: columns and curves come from the metric table, monitor
names and directions from :func:`ctx_callback.monitor.parse_monitor`, and every ``CtxCallbackError`` exits 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ctx_callback import errors
from ctx_callback.cli import COMMANDS, EXIT_USAGE, SCAN_JSON, CliError, build_parser, main, scan_to_log_history
from ctx_callback.cli.common import SCAN_FORMAT, max_positions_of
from ctx_callback.encoding import ALL_VARIANTS
from ctx_callback.metrics import METRICS, MetricSpec, metric_key
from ctx_callback.monitor import default_monitor, parse_monitor
from tests.helpers import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
CF, PAR = metric_key("counterfactual_accuracy"), metric_key("parametric_accuracy")


def error_line(stderr: str) -> str:
    """The single ``ctx-callback: error: ...`` line of ``stderr`` (and nothing else)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ctx-callback: error: ") and "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny random Llama saved with the SmolLM2 tokenizer: what ``ctx-callback probe`` loads."""
    path = tmp_path_factory.mktemp("tiny_model")
    make_tiny_llama(tokenizer, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _minimal_argv(subparser: argparse.ArgumentParser, name: str) -> list[str]:
    """``[name, positional...]``: the least a command accepts (its positionals filled with a dummy)."""
    positionals = [a for a in subparser._actions if not a.option_strings and a.dest != "help"]
    return [name] + ["unused"] * len(positionals)


def test_every_registered_command_has_a_subparser_and_the_interface():
    names = [command.NAME for command in COMMANDS]
    assert names == ["scan", "plot", "probe", "audit", "flips", "sft", "watch"]
    assert list(_subparsers(build_parser())) == names
    for command in COMMANDS:
        assert callable(command.add_parser) and callable(command.run)
        assert command.__doc__, f"{command.__name__} has no module docstring"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.NAME)
def test_command_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command.NAME, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ctx-callback {command.NAME} ")
    assert "--debug" in out and "exit codes:" in out


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.NAME)
def test_main_dispatches_to_the_command_module(command, monkeypatch):
    seen = []

    def fake_run(args):
        seen.append(args)
        return 42

    monkeypatch.setattr(command, "run", fake_run)
    argv = _minimal_argv(_subparsers(build_parser())[command.NAME], command.NAME)
    assert main(argv) == 42
    assert len(seen) == 1 and seen[0].command == command.NAME


def test_adding_a_command_is_one_module_in_the_registry(monkeypatch, capsys):
    import ctx_callback.cli as cli

    def add_parser(subparsers):
        parser = subparsers.add_parser("hello", help="say hello")
        parser.add_argument("--name", default="world")
        return parser

    def run(args):
        print(f"hello {args.name}")
        return 0

    hello = types.ModuleType("hello")
    hello.NAME, hello.add_parser, hello.run = "hello", add_parser, run
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, hello))
    assert main(["hello", "--name", "there"]) == 0
    assert capsys.readouterr().out == "hello there\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "hello" in capsys.readouterr().out


def test_help_of_every_command_loads_no_torch():
    names = [command.NAME for command in COMMANDS]
    code = ("import sys\nfrom ctx_callback.cli import main\n"
            f"for name in {names!r}:\n"
            "    try:\n        main([name, '--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "ctx_callback.cli", "probe", "--help"], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "usage: ctx-callback probe" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# Every CtxCallbackError a command raises exits 2, as one line
# ----------------------------------------------------------------------------------------------------------------

_ERROR_CLASSES = [obj for obj in (getattr(errors, name) for name in errors.__all__)
                  if isinstance(obj, type) and issubclass(obj, errors.CtxCallbackError)]


@pytest.mark.parametrize("error_class", _ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_ctx_callback_error_from_a_command_exits_2(error_class, monkeypatch, capsys):
    from ctx_callback.cli import scan

    def run(args):
        raise error_class("first line\n  second line")

    monkeypatch.setattr(scan, "run", run)
    assert main(["scan", "unused"]) == EXIT_USAGE
    assert error_line(capsys.readouterr().err) == "ctx-callback: error: first line second line"


def test_other_errors_still_exit_1(monkeypatch, capsys):
    from ctx_callback.cli import scan

    def run(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(scan, "run", run)
    assert main(["scan", "unused"]) == 1
    assert "unexpected RuntimeError: a bug" in error_line(capsys.readouterr().err)


def test_cli_error_is_the_usage_error():
    assert CliError is errors.UsageError
    assert issubclass(CliError, errors.CtxCallbackError)


def test_malformed_probe_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "context": "c", "question": "q", "counterfactual_answer": "a"}\n{not json\n')
    assert main(["probe", str(tmp_path), "--probes", str(bad), "--device", "cpu"]) == EXIT_USAGE
    line = error_line(capsys.readouterr().err)
    assert str(bad) in line and "line" in line


def test_adapter_without_base_model_exits_2(tmp_path, probes_file, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert main(["probe", str(adapter), "--probes", str(probes_file), "--device", "cpu"]) == EXIT_USAGE
    assert "names no base_model_name_or_path; pass --base-model" in error_line(capsys.readouterr().err)


def test_model_length_limit_comes_from_max_positions(tokenizer, tmp_path, probes_file, capsys):
    """The scorer gets the model's max_position_embeddings (via models.max_positions): too-long probes exit 2."""
    short = tmp_path / "short"
    make_tiny_llama(tokenizer, max_position_embeddings=8).save_pretrained(short)
    tokenizer.save_pretrained(short)
    capsys.readouterr()  # saving prints progress bars
    assert max_positions_of(str(short)) == 8
    assert max_positions_of(None) is None
    assert main(["probe", str(short), "--probes", str(probes_file), "--device", "cpu"]) == EXIT_USAGE
    assert "maximum length of 8 tokens" in error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------------------------
# --monitor: the core's parse_monitor, its messages and its directions
# ----------------------------------------------------------------------------------------------------------------


def _core_message(monitor: str, mode: str | None, variants) -> str:
    with pytest.raises(errors.ConfigurationError) as exc:
        parse_monitor(monitor, mode, variants)
    return str(exc.value)


@pytest.mark.parametrize("argv_tail, mode, variants", [
    (["--monitor", "no_such_metric"], "loglik", ALL_VARIANTS),
    (["--monitor", "closed_book_accuracy", "--variants", "context"], "loglik", ("context",)),
    (["--monitor", "aligned_accuracy", "--variants", "context,closed_book"], "loglik", ("context", "closed_book")),
    (["--monitor", "logprob_margin", "--mode", "generate"], "generate", ALL_VARIANTS),
    (["--monitor", "a/b/c"], "loglik", ALL_VARIANTS),
])
@pytest.mark.parametrize("command", ["scan", "probe"])
def test_monitor_errors_exit_2_with_the_core_message(command, argv_tail, mode, variants, tmp_path, capsys):
    (tmp_path / "checkpoint-1").mkdir()  # scan checks for checkpoints before the monitor
    monitor = argv_tail[1]
    expected = f"ctx-callback: error: --monitor: {_core_message(monitor, mode, variants)}"
    assert main([command, str(tmp_path), *argv_tail]) == EXIT_USAGE
    assert error_line(capsys.readouterr().err) == expected


def test_plot_monitor_error_exits_2(tmp_path, capsys):
    expected = f"ctx-callback: error: --monitor: {_core_message('no_such_metric', None, None)}"
    assert main(["plot", str(tmp_path), "--monitor", "no_such_metric"]) == EXIT_USAGE
    assert error_line(capsys.readouterr().err) == expected


def _scan_results(path: Path) -> Path:
    """A scan results file whose parametric-accuracy minimum (step 30) is not its counterfactual peak (step 20)."""
    values = {10: (0.2, 0.6), 20: (0.5, 0.5), 30: (0.4, 0.3)}
    rows = [{"checkpoint": f"checkpoint-{step}", "step": step, "kind": "full", "seconds": 0.1,
             "path": str(path / f"checkpoint-{step}"),
             "metrics": {CF: cf, PAR: par, metric_key("parametric_accuracy", "capitals"): par}}
            for step, (cf, par) in values.items()]
    scan = {"format": SCAN_FORMAT, "output_dir": str(path / "missing_run"), "monitor": CF,
            "greater_is_better": True, "peak": {"checkpoint": "checkpoint-20", "step": 20, "value": 0.5,
                                                "path": str(path / "checkpoint-20")},
            "rows": rows, "scans": {}}
    file = path / SCAN_JSON
    file.write_text(json.dumps(scan))
    return file


@pytest.mark.parametrize("monitor", ["parametric_accuracy", "ctx_reliance/parametric_accuracy",
                                     "eval_ctx_reliance/parametric_accuracy", "capitals/parametric_accuracy"])
def test_plot_parametric_monitor_picks_the_minimum(monitor, tmp_path, monkeypatch, capsys):
    import ctx_callback.plotting

    drawn = {}

    def fake_plot(history, output, *, monitor_key, **kwargs):
        drawn.update(history=history, output=output, monitor_key=monitor_key)
        Path(output).write_bytes(b"")
        return str(output)

    monkeypatch.setattr(ctx_callback.plotting, "plot_reliance", fake_plot)
    scan_file = _scan_results(tmp_path)
    assert main(["plot", str(scan_file), "--monitor", monitor, "-o", str(tmp_path / "out.png")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert drawn["monitor_key"] == parse_monitor(monitor).key
    peaks = {row["ctx_reliance/peak_step"] for row in drawn["history"]}
    assert peaks == {30.0}  # the lowest parametric accuracy, not the counterfactual peak at step 20
    # The default monitor keeps the scan's own (maximum) peak.
    assert {r["ctx_reliance/peak_step"] for r in scan_to_log_history(json.loads(scan_file.read_text()))} == {20.0}
    assert {r["ctx_reliance/peak_step"] for r in scan_to_log_history(json.loads(scan_file.read_text()), PAR)} == {30.0}


# ----------------------------------------------------------------------------------------------------------------
# Columns and curves come from the metric table
# ----------------------------------------------------------------------------------------------------------------


def _probe_table(model_dir: Path, probes_file: Path, extra: list[str], capsys) -> tuple[dict, list[str]]:
    argv = ["probe", str(model_dir), "--probes", str(probes_file), "--device", "cpu", *extra]
    assert main([*argv, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert main(argv) == 0
    return metrics, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("extra", [[], ["--variants", "context"], ["--mode", "generate"]],
                         ids=["loglik", "loglik-context-only", "generate"])
def test_probe_table_has_a_column_for_every_metric_in_the_json(extra, model_dir, probes_file, capsys):
    metrics, lines = _probe_table(model_dir, probes_file, extra, capsys)
    present = [spec for spec in METRICS if spec.key in metrics]
    assert present and {spec.name for spec in present} == {key.split("/")[-1] for key in metrics}
    expected = [spec.short for spec in present if spec.name != "num_probes"]
    header = lines[0].split()
    assert header == ["family", "probes", *expected]  # every metric, in METRICS order
    legend = lines[-2]
    assert legend == "(" + ", ".join(f"{s.short} = {s.name}" for s in present if s.name != "num_probes") + ")"
    rows = {line.split()[0]: line.split() for line in lines[2:-2]}
    assert set(rows) == {"all", "capitals"}
    for family, cells in rows.items():
        group = None if family == "all" else family
        assert int(cells[1]) == metrics[metric_key("num_probes", group)]
        for spec, cell in zip((s for s in present if s.name != "num_probes"), cells[2:]):
            value = metrics[metric_key(spec.name, group)]
            # Exact strings: both runs score the same weights with the same settings in this process (same batches).
            assert cell == ("-" if value != value else f"{value:.3f}"), (family, spec.name)
    mode = "generate" if "generate" in extra else "loglik"
    assert lines[-1].startswith(f"{metric_key(default_monitor(mode))} = ")  # the default monitor of the mode


def test_probe_table_picks_up_a_new_metric(monkeypatch):
    """A metric added to METRICS gets a column without touching the CLI."""
    from ctx_callback.cli import probe

    extra = MetricSpec("made_up_rate", "a metric that does not exist", short="madeup", modes=("loglik",),
                       compute=lambda table: 0.0)
    monkeypatch.setattr(probe, "METRICS", (*METRICS, extra))
    metrics = {CF: 0.5, metric_key("num_probes"): 3.0, metric_key("made_up_rate", "capitals"): 0.25}
    assert [spec.name for spec in probe.table_metrics(metrics)] == ["counterfactual_accuracy", "made_up_rate"]


def test_scan_table_shows_summary_metrics_and_the_monitored_one():
    from ctx_callback.cli.scan import _table_metrics

    names = [spec.name for spec in METRICS]
    rows = [{metric_key(name): 0.5 for name in names}]
    summary = [spec.name for spec in METRICS if spec.in_summary_table]
    assert _table_metrics(rows, CF) == summary
    assert _table_metrics(rows, metric_key("logprob_margin", "capitals")) == [*summary, "logprob_margin"]
    assert _table_metrics([{CF: 0.5}], metric_key("logprob_margin")) == ["counterfactual_accuracy"]


def test_plot_curves_come_from_the_metric_table():
    from ctx_callback.plotting import plot_curves

    _CURVES = plot_curves()
    assert _CURVES == tuple((spec.name, spec.plot_label) for spec in METRICS if spec.plot_label is not None)
    assert [name for name, _ in _CURVES][:3] == ["counterfactual_accuracy", "parametric_accuracy",
                                                 "closed_book_accuracy"]
