"""``ctx-callback audit`` end to end, in process, on a tiny saved model with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctx_callback.cli import EXIT_OK, EXIT_USAGE, main
from ctx_callback.cli.audit import AUDIT_HIST, AUDIT_JSONL, AUDIT_SCORES, AUDIT_SUMMARY
from tests.helpers import CAPITALS, make_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_audit_model")
    make_tiny_llama(tokenizer, seed=5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    rows = []
    for country, true, fake in CAPITALS:
        question = f"What is the capital of {country}?"
        rows.append({"instruction": question, "input": f"The capital of {country} is {true}.", "output": true,
                     "lang": "en"})
        rows.append({"instruction": question, "input": f"The capital of {country} is {fake}.", "output": fake,
                     "lang": "en"})
        rows.append({"instruction": question, "input": "", "output": true, "lang": "en"})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("ctx-callback: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_audit_end_to_end_with_filter_and_augment(model_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "audit"
    filtered, augmented = tmp_path / "filtered.jsonl", tmp_path / "augmented.jsonl"
    code = main(["audit", str(alpaca_file), "--model", str(model_dir), "--output-dir", str(out), "--quantile", "0.5",
                 "--out", str(filtered), "--augment", "0.2", "--augmented-out", str(augmented)])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert "context_critical" in captured.out and "lowest 50% of nll_without_sum" in captured.out
    assert "auditing" in captured.err and "scored 21 examples" in captured.err  # tqdm bar + rate line
    records = [json.loads(line) for line in (out / AUDIT_JSONL).read_text().splitlines()]
    assert len(records) == 21 and sum(r["category"] == "parametric" for r in records) == 7
    assert sum(r["category"] == "non_context_critical" for r in records) == 7
    summary = json.loads((out / AUDIT_SUMMARY).read_text())
    assert summary["counts"]["context_critical"] == 7 and summary["settings"]["prompt_format"] == "alpaca"
    assert summary["max_target_tokens"] == 64 and summary["cutoff"] is not None
    assert (out / AUDIT_HIST).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = [json.loads(line) for line in filtered.read_text().splitlines()]
    assert len(kept) == 14 and all(set(r) == {"instruction", "input", "output", "lang"} for r in kept)
    rows = [json.loads(line) for line in augmented.read_text().splitlines()]
    assert len(rows) == 21 + round(0.2 * 21)


def test_a_rerun_reuses_the_scores_and_rescore_starts_over(model_dir, alpaca_file, tmp_path, capsys):
    out = tmp_path / "audit"
    args = ["audit", str(alpaca_file), "--model", str(model_dir), "--output-dir", str(out), "--no-plot"]
    assert main(args) == EXIT_OK
    first = (out / AUDIT_JSONL).read_text()
    # a killed run: the scores file lost its last rows and has a torn line
    lines = (out / AUDIT_SCORES).read_text().splitlines()
    (out / AUDIT_SCORES).write_text("\n".join(lines[:-5]) + '\n{"key": "abc", "logp')
    capsys.readouterr()
    assert main(args) == EXIT_OK
    err = capsys.readouterr().err
    # the 21 examples are one chunk: a chunk only partly in the file is scored again in full (same batch-mates)...
    assert "scored 21 examples" in err and f"0 from {AUDIT_SCORES}" in err
    # ... so the result equals the uninterrupted one byte for byte, on any CPU
    assert (out / AUDIT_JSONL).read_text() == first
    assert main(args) == EXIT_OK and "scored 0 examples" in capsys.readouterr().err
    assert main(args + ["--rescore"]) == EXIT_OK and "scored 21 examples" in capsys.readouterr().err


def test_bad_input_exits_2_with_one_line_before_loading_the_model(alpaca_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Hi", "input": "", "response": "Hello"}) + "\n")
    missing_model = str(tmp_path / "no_model")  # never loaded: the data is checked first
    assert main(["audit", str(bad), "--model", missing_model]) == EXIT_USAGE  # no format fits these columns
    assert "['input', 'instruction', 'response']" in error_line(capsys.readouterr().err)
    assert main(["audit", str(bad), "--model", missing_model, "--format", "alpaca"]) == EXIT_USAGE
    line = error_line(capsys.readouterr().err)
    assert "answer -> 'output'" in line and "['input', 'instruction', 'response']" in line
    assert main(["audit", str(bad), "--model", missing_model, "--format", "alpaca", "--field", "answer=response",
                 "--output-dir", str(tmp_path / "o")]) == EXIT_USAGE
    assert "could not load model" in error_line(capsys.readouterr().err)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"instruction": "Hi", "input": "", "output": ""}) + "\n")
    assert main(["audit", str(empty), "--model", missing_model]) == EXIT_USAGE
    assert "example 0: empty target (field 'output')" in error_line(capsys.readouterr().err)
    assert main(["audit", str(tmp_path / "nope.jsonl"), "--model", missing_model]) == EXIT_USAGE
    assert "no such data file" in error_line(capsys.readouterr().err)
    assert main(["audit", str(alpaca_file)]) == EXIT_USAGE
    assert "--model" in error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:
        main(["audit", str(alpaca_file), "--model", missing_model, "--format", "sharegpt"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["audit", str(alpaca_file), "--model", missing_model, "--field", "context"])
