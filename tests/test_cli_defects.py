"""User-found defects of the command line (issue 20), each reproduced on real files of a real tiny training run.

- ``plot OUTPUT_DIR`` after an early stop past the last checkpoint: the run's own record (``ctx_reliance_summary.json``)
  is drawn, with its stop and peak, not the older ``checkpoint-*/trainer_state.json``.
- ``flips`` on a probe log written twice (identical rows: deduplicated, with a note), mixing two runs (conflicting
  rows: refused) or cut mid-event (different probe sets: a warning naming the counts).
- Multiple-choice options that the answer normalization reads as one answer (``oxygen`` / ``oxygen.``): refused when
  the probes load.

One early-stopped run (module-scoped, a few seconds) and one even shorter run of another model provide the files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ctx_callback import ContextRelianceCallback, ProbeFormatError, load_probes
from ctx_callback.cli import main
from ctx_callback.matching import match_answers
from ctx_callback.outcomes import PROBES_FILE, SUMMARY_FILE
from ctx_callback.plotting import PNG_METADATA_KEY
from tests.helpers import PROBES, conflict_dataset, make_tiny_llama, make_trainer

CF_ACC = "ctx_reliance/counterfactual_accuracy"
STOP = 3  # the stopped run's early stop: after its last checkpoint (checkpoint-2)
EVENTS = 7 * (STOP + 1)  # rows in its probe log: 7 probes at steps 0..STOP


def _run(tokenizer, output_dir: Path, *, seed: int, max_steps: int, **callback_kwargs) -> ContextRelianceCallback:
    """A tiny SFT run with the callback probing every step (7 capital-city probes, two variants)."""
    trainer = make_trainer(make_tiny_llama(tokenizer, seed=seed), tokenizer, output_dir,
                           dataset=conflict_dataset(1, 1), max_steps=max_steps, per_device_train_batch_size=2,
                           learning_rate=2e-2, save_strategy="steps", save_steps=2)
    callback = ContextRelianceCallback(trainer, PROBES, eval_steps=1, variants=("context", "closed_book"),
                                       verbose=False, **callback_kwargs)
    trainer.add_callback(callback)
    trainer.train()
    return callback


@pytest.fixture(scope="module")
def stopped_run(tokenizer, tmp_path_factory) -> Path:
    """Stopped early at step 3 by a real stop rule (a floor every value is under, from step 3 on); one checkpoint,
    at step 2, so the newest ``trainer_state.json`` ends one probe event before the stop."""
    out = tmp_path_factory.mktemp("stopped_run")
    callback = _run(tokenizer, out, seed=0, max_steps=6, monitor="counterfactual_accuracy", warmup_steps=STOP,
                    stopping_threshold=2.0)
    assert callback.stop_step == STOP
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    return out


@pytest.fixture(scope="module")
def other_run(tokenizer, tmp_path_factory) -> Path:
    """Another model's run (one step: probe events at steps 0 and 1), whose log a user might ``cat`` onto the first."""
    out = tmp_path_factory.mktemp("other_run")
    _run(tokenizer, out, seed=1, max_steps=1)
    return out


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _drawn(png: Path) -> dict:
    """What the PNG was drawn from, as ``plot_reliance`` records it in the file (a PNG text chunk)."""
    with Image.open(png) as image:
        return json.loads(image.text[PNG_METADATA_KEY])


def _reliance_steps(trainer_state: Path) -> list[int]:
    return [r["step"] for r in _read(trainer_state)["log_history"] if CF_ACC in r]


def _copy_run(run: Path, target: Path) -> Path:
    """The run's records without the weights (what plot and flips read)."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "*.pth", "*.bin"))
    return target


# ----------------------------------------------------------------------------------------------------------------
# Item 7: plot OUTPUT_DIR draws the run's full record
# ----------------------------------------------------------------------------------------------------------------


def test_plot_output_dir_draws_the_summary_up_to_the_stop(stopped_run, tmp_path, capsys):
    summary = _read(stopped_run / SUMMARY_FILE)["summary"]
    assert summary["stop_step"] == STOP
    assert _reliance_steps(stopped_run / "checkpoint-2" / "trainer_state.json")[-1] == 2  # the defect's setting
    png = tmp_path / "curve.png"
    assert main(["plot", str(stopped_run), "-o", str(png)]) == 0
    out = capsys.readouterr().out
    assert SUMMARY_FILE in out and f"stop at step {STOP}" in out
    drawn = _drawn(png)
    assert drawn["steps"] == [0, 1, 2, 3]
    assert drawn["stop_step"] == STOP
    assert drawn["peak_step"] == summary["peak_step"]
    assert drawn["monitor"] == summary["monitor"] == CF_ACC  # the run's monitor, read from its summary
    assert drawn["loss_steps"]  # training loss from the newest trainer state, on the second axis
    # The summary file itself is an INPUT too.
    assert main(["plot", str(stopped_run / SUMMARY_FILE), "-o", str(png)]) == 0
    assert _drawn(png)["steps"] == [0, 1, 2, 3] and _drawn(png)["stop_step"] == STOP


def test_plot_output_dir_takes_the_fuller_record_and_falls_back_to_the_trainer_state(stopped_run, tmp_path, capsys):
    run = _copy_run(stopped_run, tmp_path / "run")
    # A summary that ends before the newest checkpoint (a stale copy): the trainer state is fuller.
    record = _read(run / SUMMARY_FILE)
    record["history"] = [r for r in record["history"] if r["step"] <= 1]
    record["summary"]["stop_step"] = None
    (run / SUMMARY_FILE).write_text(json.dumps(record))
    assert main(["plot", str(run), "-o", str(tmp_path / "a.png")]) == 0
    captured = capsys.readouterr()
    assert "checkpoint-2/trainer_state.json" in captured.out
    assert "ends at step 1" in captured.err  # says which record was set aside, and why
    assert _drawn(tmp_path / "a.png")["steps"] == [0, 1, 2]
    # A summary of another run (a different value at a shared step): the later record is drawn, with a warning.
    record = _read(stopped_run / SUMMARY_FILE)
    record["history"][1][CF_ACC] = 1.0 - record["history"][1][CF_ACC]
    (run / SUMMARY_FILE).write_text(json.dumps(record))
    assert main(["plot", str(run), "-o", str(tmp_path / "c.png")]) == 0
    captured = capsys.readouterr()
    assert SUMMARY_FILE in captured.out and "disagree at step 1" in captured.err and "different runs" in captured.err
    # No summary at all: the newest checkpoint's trainer state, as before.
    (run / SUMMARY_FILE).unlink()
    assert main(["plot", str(run), "-o", str(tmp_path / "b.png")]) == 0
    assert "checkpoint-2/trainer_state.json" in capsys.readouterr().out
    drawn = _drawn(tmp_path / "b.png")
    assert drawn["steps"] == [0, 1, 2] and drawn["stop_step"] is None


def test_plot_help_says_which_record_wins(capsys):
    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert SUMMARY_FILE in text and "later last step wins" in text


# ----------------------------------------------------------------------------------------------------------------
# Item 9a: flips on concatenated and truncated probe logs
# ----------------------------------------------------------------------------------------------------------------


def _flips_json(run: Path, capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["flips", str(run), "--json", *args])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def _log_dir(tmp_path: Path, text: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / PROBES_FILE).write_text(text)
    return run


def test_flips_on_a_log_written_twice_drops_the_identical_rows_with_a_note(stopped_run, tmp_path, capsys):
    code, reference, err = _flips_json(stopped_run, capsys, "--from", "0")
    assert code == 0 and err == ""
    log = (stopped_run / PROBES_FILE).read_text()
    rows = log.count("\n")
    assert rows == EVENTS
    code, report, err = _flips_json(_log_dir(tmp_path, log + log), capsys, "--from", "0")
    assert code == 0 and report is not None and reference is not None
    assert f"{rows} duplicate rows" in err and "identical" in err
    assert report["warnings"] and report["num_probes"] == 7
    assert {k: v for k, v in report.items() if k != "warnings"} == {k: v for k, v in reference.items()
                                                                    if k != "warnings"}


def test_flips_refuses_a_log_that_mixes_two_runs(stopped_run, other_run, tmp_path, capsys):
    ours = (stopped_run / PROBES_FILE).read_text()
    theirs = (other_run / PROBES_FILE).read_text()
    assert [json.loads(line)["step"] for line in theirs.splitlines()] == [0] * 7 + [1] * 7
    run = _log_dir(tmp_path, ours + theirs)  # `cat run_a/... run_b/...`: step 0 twice, with other outcomes
    code, _, err = _flips_json(run, capsys, "--from", "0", "--to", str(STOP))
    assert code == 2
    first = json.loads(theirs.splitlines()[0])["id"]
    assert "conflicting rows" in err and f"probe {first!r} at step 0" in err
    assert f"line 1 and line {EVENTS + 1}" in err  # the two rows
    assert f"line {EVENTS + 1} (step 0 after step {STOP})" in err  # where the second run starts


def test_flips_warns_when_the_last_event_was_cut_short(stopped_run, tmp_path, capsys):
    lines = (stopped_run / PROBES_FILE).read_text().splitlines(keepends=True)
    cut = "".join(lines[:-4]) + lines[-4][:25]  # killed while writing step 3: 3 rows kept, the 4th cut mid-line
    code, report, err = _flips_json(_log_dir(tmp_path, cut), capsys, "--from", "0")
    assert code == 0 and report is not None
    assert report["to_step"] == STOP and report["num_probes"] == 3
    assert f"line {EVENTS - 3} is not a valid JSON probe row" in err
    assert "step 0 has 7 probes" in err and f"step {STOP} has 3" in err
    assert len(report["warnings"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# Item 9b: options that normalize to the same answer
# ----------------------------------------------------------------------------------------------------------------


def _gas_record(**changes) -> dict:
    record = {"id": "science/plants-gas", "family": "science", "context": "Plants release carbon dioxide.",
              "question": "Which gas do plants release?", "counterfactual_answer": "carbon dioxide",
              "parametric_answer": "oxygen", "options": ["oxygen", "carbon dioxide", "oxygen.", "nitrogen"]}
    record.update(changes)
    return record


def test_options_equal_after_answer_normalization_are_refused_at_load(tmp_path, capsys):
    record = _gas_record()
    # Why: generation matching cannot tell them apart ("Oxygen." names both options).
    assert match_answers("Oxygen.", [(option,) for option in record["options"]]) == [True, False, True, False]
    path = tmp_path / "gas.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ProbeFormatError) as info:
        load_probes(str(path))
    message = str(info.value)
    assert "gas.jsonl" in message and "line 1" in message and "probe 'science/plants-gas'" in message
    assert "options 0 and 2" in message and "'oxygen'" in message and "'oxygen.'" in message
    # The command line refuses the file before loading any model: exit 2, the same message.
    assert main(["probe", "smollm2-135m-instruct", "--probes", str(path)]) == 2
    assert "'oxygen.'" in capsys.readouterr().err


def test_answers_name_options_under_the_same_normalization(tmp_path):
    options = ["oxygen", "carbon dioxide", "nitrogen"]
    probe = load_probes([_gas_record(options=options, parametric_answer="Oxygen.")])[0]
    assert probe.parametric_answer == "oxygen"  # the option as written
    with pytest.raises(ProbeFormatError, match=r"probe 'science/plants-gas'.*name the same option 'oxygen'"):
        load_probes([_gas_record(options=options, counterfactual_answer="oxygen", parametric_answer="Oxygen.")])
