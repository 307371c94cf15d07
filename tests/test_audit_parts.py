"""The parts of the data audit on their own: data loading, the resume file, the result and its records, the plot
(see :mod:`ctx_callback.audit.core`, which wires them into ``audit_dataset``)."""

from __future__ import annotations

import json
import logging

import pytest

import ctx_callback.audit as audit
import ctx_callback.audit.core as core
from ctx_callback.audit.adapters import AuditExample
from ctx_callback.audit.data import column_names, key_columns, row_keys
from ctx_callback.audit.result import AuditResult, apply_rule, example_record, rule_cutoff
from ctx_callback.audit.resume import AUDIT_SCORES_FORMAT, model_signature, read_resume, score_key, start_resume
from ctx_callback.audit.rules import resolve_rule
from ctx_callback.errors import AuditDataError
from tests.helpers import make_tiny_llama


def test_core_still_exports_every_name_it_had():
    for name in core.__all__:
        assert getattr(core, name) is getattr(audit, name, getattr(core, name))
    assert core.AUDIT_SCORES_FORMAT == AUDIT_SCORES_FORMAT == "ctx_callback.audit_scores/1"


def test_column_names_of_records_in_first_seen_order_and_row_keys_by_content():
    rows = [{"q": "a", "ctx": "x"}, {"q": "b", "answer": 1}]
    assert column_names(rows) == ["q", "ctx", "answer"]
    with pytest.raises(AuditDataError, match="not a record"):
        column_names(["just text"])
    assert key_columns("alpaca", {"question": "q", "context": "ctx"}, ["q", "ctx", "extra"]) == ["ctx", "q"]
    assert key_columns("split", {}, ["b", "a"]) == ["a", "b"]
    shuffled = list(reversed(rows))
    assert row_keys(rows, ["q", "ctx"]) == list(reversed(row_keys(shuffled, ["q", "ctx"])))
    assert row_keys([{"q": "a", "ctx": None}], ["q", "ctx"]) == row_keys([{"q": "a"}], ["q", "ctx"])


def test_resume_file_round_trip_other_settings_and_a_torn_line(tmp_path, caplog):
    path = tmp_path / "scores.jsonl"
    example = AuditExample(0, "ctx", "q?", "a", None)
    key = score_key(example)
    assert score_key(AuditExample(0, "ctx", "q?", "a", "Be brief.")) != key  # an own system turn is part of it
    handle = start_resume(path, "fp1", {key: {"key": key, "index": 0, "logprob_with": -1.0}})
    handle.write('{"key": "torn", "ind')  # a line cut off when the audit was killed
    handle.close()
    assert json.loads(path.read_text().splitlines()[0]) == {"format": AUDIT_SCORES_FORMAT, "fingerprint": "fp1"}
    assert read_resume(path, "fp1") == {key: {"key": key, "index": 0, "logprob_with": -1.0}}
    with caplog.at_level(logging.WARNING, logger="ctx_callback"):
        assert read_resume(path, "fp2") == {}
    assert "holds scores of other settings" in caplog.records[0].getMessage()
    assert caplog.records[0].name == "ctx_callback.audit.core"  # the logger users already configure
    assert read_resume(tmp_path / "missing.jsonl", "fp1") == {}


def test_model_signature_follows_the_weights(tokenizer):
    first, same, other = make_tiny_llama(tokenizer, seed=1), make_tiny_llama(tokenizer, seed=1), make_tiny_llama(
        tokenizer, seed=2)
    assert model_signature(first) == model_signature(same) != model_signature(other)


def _records() -> list[dict]:
    examples = [AuditExample(i, "ctx" if i < 3 else None, "q", "a", None) for i in range(4)]
    scores = [{"logprob_with": -2.0, "logprob_without": -2.0 - gain, "tokens_with": 2, "tokens_without": 2,
               "target_tokens": 2, "prompt_tokens": 5} for gain in (4.0, 0.5, 2.0, 1.0)]
    records = [example_record(e, score_key(e), None, s, False) for e, s in zip(examples, scores)]
    return records + [{"index": 4, "category": "invalid", "has_context": None, "too_long": False}]


def test_example_record_turns_scores_into_nlls_and_the_context_gain():
    record = _records()[1]
    assert record["nll_with_context"] == 1.0 and record["nll_without_context"] == 1.25
    assert record["context_gain"] == 0.25 and record["nll_without_context_sum"] == 2.5
    assert record["target_tokens"] == 2 and record["prompt_tokens"] == 5 and record["truncated"] is False
    unscored = example_record(AuditExample(7, "c", "q", "a", None), "k", None, None, True)
    assert unscored["context_gain"] is None and unscored["too_long"] and unscored["key"] == "k"


def test_rules_leave_invalid_rows_alone_and_recategorize_needs_no_model(tmp_path):
    records = _records()
    rule = resolve_rule("default", quantile=0.34)
    apply_rule(records, rule)
    assert [r["category"] for r in records] == ["context_critical", "non_context_critical", "context_critical",
                                                "parametric", "invalid"]
    result = AuditResult(records, rule, rule_cutoff(records, rule), {"max_target_tokens": 64})
    assert result.counts()["invalid"] == 1 and result.indices("non_context_critical") == [1]
    assert result.recategorize("default", quantile=0.67).indices("non_context_critical") == [1, 2]
    assert result.indices("non_context_critical") == [1]  # the original is untouched
    assert "rule " in result.table() and result.summary["rows"] == 5
    path = result.to_jsonl(tmp_path / "audit.jsonl")
    assert all("key" not in json.loads(line) for line in open(path))


def test_plot_histogram_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = _records()
    rule = resolve_rule("default")
    apply_rule(records, rule)
    result = AuditResult(records, rule, rule_cutoff(records, rule), {"max_target_tokens": 64})
    out = result.plot_histogram(tmp_path / "hist.png")
    assert out == str(tmp_path / "hist.png") and (tmp_path / "hist.png").read_bytes()[:4] == b"\x89PNG"
