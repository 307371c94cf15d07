"""The data side of the audit: every adapter on fixture files, every bad input (before any forward pass), filtering,
counterfactual augmentation and probes from QA data."""

from __future__ import annotations

import csv
import json

import datasets
import pytest
import torch

from ctx_callback import ProbeScorer
from ctx_callback.audit import (
    AUDIT_FORMATS,
    answer_shape,
    audit_dataset,
    augment_dataset,
    counterfactual_substitutions,
    filter_dataset,
    load_audit_data,
    prepare_examples,
    probes_from_qa,
    register_audit_format,
)
from ctx_callback.errors import AuditDataError, ConfigurationError, CtxCallbackError

EXPECTED = [("The capital of France is Lyon.", "What is the capital of France?", "Lyon"),
            (None, "What is the capital of Japan?", "Tokyo"),
            ("Rome was founded in 753 BC.", "When was Rome founded?", "753 BC")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def extracted(source, **kwargs):
    examples, _, name, _ = prepare_examples(load_audit_data(source), **kwargs)
    return name, [(e.context, e.question, e.answer) for e in examples]


@pytest.fixture
def counting_model(tiny_model):
    """The tiny model with a counter of its forward calls (bad input must be reported before the first)."""
    calls = []
    tiny_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    tiny_model.calls = calls
    return tiny_model


# ----------------------------------------------------------------------------------------------------------------
# Adapters, each on a file written here
# ----------------------------------------------------------------------------------------------------------------


def test_alpaca_json_file(tmp_path):
    rows = [{"instruction": q, "input": c or "", "output": a, "source": "x"} for c, q, a in EXPECTED]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    assert extracted(str(path)) == ("alpaca", EXPECTED)
    assert AUDIT_FORMATS["alpaca"].prompt_format == "alpaca"


def test_qa_jsonl_with_renamed_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"passage": c, "query": q, "target": a} for c, q, a in EXPECTED])
    with pytest.raises(AuditDataError, match="cannot tell where the context is"):
        extracted(str(path))
    fields = {"context": "passage", "question": "query", "answer": "target"}
    assert extracted(str(path), data_format="qa", fields=fields) == ("qa", EXPECTED)


def test_prompt_completion_csv_with_a_context_column(tmp_path):
    path = tmp_path / "pc.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion", "context"])
        for c, q, a in EXPECTED:  # the prompt embeds the context: the question is the prompt without it
            writer.writerow([f"{c}\n\n{q}" if c else q, a, c or ""])
    assert extracted(str(path)) == ("prompt_completion", EXPECTED)


def test_conversational_prompt_completion_and_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}],
             "context": c or ""} for c, q, a in EXPECTED]
    write_jsonl(folder / "train.jsonl", rows)
    name, got = extracted(str(folder))  # datasets.load_dataset(folder)
    assert name == "prompt_completion" and got == EXPECTED


def test_messages_split_at_the_last_blank_line_or_by_a_context_column(tmp_path):
    def conv(user, answer):
        return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]

    plain = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv(f"{c}\n\n{q}" if c else q, a)}
                                                  for c, q, a in EXPECTED])
    assert extracted(str(plain)) == ("messages", EXPECTED)
    with_column = write_jsonl(tmp_path / "chat_ctx.jsonl", [
        {"messages": conv(f"Passage: {c}\n\n{q}" if c else q, a), "passage": c or ""} for c, q, a in EXPECTED])
    name, got = extracted(str(with_column), fields={"context": "passage"})
    assert name == "messages"
    assert [(c, q.removeprefix("Passage:").strip(), a) for c, q, a in got] == EXPECTED


def test_a_split_callable_and_a_registered_format():
    rows = [{"text": f"{c or ''}|{q}|{a}"} for c, q, a in EXPECTED]

    def split(example):
        c, q, a = example["text"].split("|")
        return c or None, q, a

    assert extracted(rows, split=split) == ("split", EXPECTED)
    name = "pipe_test_format"
    if name not in AUDIT_FORMATS:
        @register_audit_format(name, columns={"text": "text"}, detect=lambda cols: cols == {"text"})
        def _pipe(example, columns):
            return split(example)

    assert extracted(rows) == (name, EXPECTED)
    with pytest.raises(ConfigurationError, match="already registered"):
        register_audit_format(name)(lambda example, columns: ("", "", ""))


def test_hub_ids_go_through_load_dataset_and_fail_cleanly_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(AuditDataError, match="could not load the dataset 'nobody/no_such_dataset'"):
        load_audit_data("nobody/no_such_dataset")


# ----------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the example and the field, before any forward pass
# ----------------------------------------------------------------------------------------------------------------


def test_missing_column_lists_the_existing_ones(counting_model, tokenizer):
    rows = [{"instruction": "Say hi.", "inputs": "", "response": "Hi."}]
    with pytest.raises(AuditDataError) as err:
        audit_dataset(rows, counting_model, tokenizer, data_format="alpaca")
    assert "answer -> 'output'" in str(err.value) and "['inputs', 'instruction', 'response']" in str(err.value)
    with pytest.raises(ConfigurationError, match="roles are"):
        audit_dataset(rows, counting_model, tokenizer, data_format="alpaca", fields={"reply": "response"})
    assert counting_model.calls == []


def test_empty_target_names_the_example_and_field_or_is_skipped(counting_model, tokenizer):
    rows = [{"context": "c", "question": "q", "answer": "a"}, {"context": "c", "question": "q", "answer": "  "}]
    with pytest.raises(AuditDataError, match=r"example 1: empty target \(field 'answer'\).*invalid='skip'"):
        audit_dataset(rows, counting_model, tokenizer, data_format="qa", prompt_format="plain")
    assert counting_model.calls == []
    result = audit_dataset(rows, counting_model, tokenizer, data_format="qa", prompt_format="plain",
                           invalid="skip")
    assert result.categories[1] == "invalid" and result.summary["invalid"] == 1
    assert len(filter_dataset(rows, result, drop=("parametric",))) == 2  # invalid rows are kept


def test_wrong_types_and_split_shapes(counting_model, tokenizer):
    # numbers are read as text (a year answer); anything else that is not a string is an error
    with pytest.raises(AuditDataError, match=r"example 1, field 'answer' \(answer\) must be a string or a number, "
                                             r"got list"):
        audit_dataset([{"context": "c", "question": "q", "answer": 3}, {"context": "c", "question": "q",
                                                                        "answer": ["a"]}],
                      counting_model, tokenizer, data_format="qa")
    with pytest.raises(AuditDataError, match="example 0: the split callable returned a tuple of length 2"):
        audit_dataset([{"t": "x"}], counting_model, tokenizer, split=lambda ex: ("c", "q"))
    with pytest.raises(AuditDataError, match="example 0: the split callable returned a str"):
        audit_dataset([{"t": "x"}], counting_model, tokenizer, split=lambda ex: "c|q|a")
    with pytest.raises(AuditDataError, match="example 1: the split callable raised KeyError"):
        audit_dataset([{"t": "x"}, {"u": "y"}], counting_model, tokenizer, split=lambda ex: (None, ex["t"], "a"))
    with pytest.raises(AuditDataError, match="example 0, the question the split callable returned must be a string"):
        audit_dataset([{"t": "x"}], counting_model, tokenizer, split=lambda ex: (None, {"q": 5}, "a"))
    with pytest.raises(AuditDataError, match="has no 'assistant' turn"):
        audit_dataset([{"messages": [{"role": "user", "content": "hi"}]}], counting_model, tokenizer)
    assert counting_model.calls == []


def test_unknown_format_empty_data_and_missing_files(counting_model, tokenizer, tmp_path):
    rows = [{"context": "c", "question": "q", "answer": "a"}]
    with pytest.raises(ConfigurationError, match="unknown data format 'sharegpt'.*alpaca"):
        audit_dataset(rows, counting_model, tokenizer, data_format="sharegpt")
    with pytest.raises(AuditDataError, match="the dataset is empty"):
        audit_dataset([], counting_model, tokenizer)
    with pytest.raises(AuditDataError, match="no such data file or folder"):
        audit_dataset(str(tmp_path / "missing.jsonl"), counting_model, tokenizer)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(AuditDataError, match="unknown data file type '.txt'"):
        audit_dataset(str(tmp_path / "data.txt"), counting_model, tokenizer)
    assert counting_model.calls == []
    assert issubclass(AuditDataError, CtxCallbackError)


# ----------------------------------------------------------------------------------------------------------------
# Filter, augment, probes
# ----------------------------------------------------------------------------------------------------------------


def knowledge_rows():
    rows = []
    people = [("Hamlet", "William Shakespeare"), ("War and Peace", "Leo Tolstoy"), ("Emma", "Jane Austen"),
              ("Ulysses", "James Joyce")]
    for work, author in people:
        rows.append({"context": f"{work} was written by {author}.", "question": f"Who wrote {work}?",
                     "answer": author, "id": f"w-{work}"})
    for event, year in [("the Moon landing", "1969"), ("the fall of the Berlin Wall", "1989"),
                        ("the first World Cup", "1930")]:
        rows.append({"context": f"{event.capitalize()} happened in {year}.", "question": f"When was {event}?",
                     "answer": f"{year}.", "id": f"y-{event}"})
    for thing, count in [("legs does a spider have", "8"), ("days are in a leap year", "366"),
                         ("keys has a piano", "88")]:
        rows.append({"context": f"Fact: it has {count} of them.", "question": f"How many {thing}?", "answer": count,
                     "id": f"n-{thing}"})
    rows.append({"context": "It is a sunny day.", "question": "Describe the weather.",
                 "answer": "it is warm and bright", "id": "free"})
    rows.append({"context": "", "question": "What is the capital of Peru?", "answer": "Lima", "id": "closed"})
    return rows


def test_answer_shapes():
    assert [answer_shape(a) for a in ("1969", "1969.", "366", "3,500", "Leo Tolstoy", "Hamlet", "Statue of Liberty",
                                      "it is warm", "eight", "")] == [
        "year", "year", "number", "number", "name", "name", "name", None, None, None]


def test_filter_keeps_every_other_column_and_can_weight_instead(tiny_model, tokenizer):
    data = datasets.Dataset.from_list(knowledge_rows())
    result = audit_dataset(data, tiny_model, tokenizer, data_format="qa", quantile=0.5)
    flagged = set(result.indices("non_context_critical"))
    assert len(flagged) == 6  # half of the 11 context examples, rounded half up
    filtered = filter_dataset(data, result)
    assert filtered.column_names == data.column_names and filtered.features == data.features
    assert filtered["id"] == [row["id"] for i, row in enumerate(data) if i not in flagged]
    weighted = filter_dataset(data, result, weight_column="weight")
    assert len(weighted) == len(data) and weighted["weight"] == [0.0 if i in flagged else 1.0 for i in range(12)]
    assert weighted["id"] == data["id"]
    with pytest.raises(ConfigurationError, match="pass the dataset that was audited"):
        filter_dataset(data.select(range(5)), result)


def test_augmentation_is_deterministic_and_shape_preserving():
    data = datasets.Dataset.from_list(knowledge_rows())
    first = augment_dataset(data, fraction=0.5, seed=3)
    assert first.to_list() == augment_dataset(data, fraction=0.5, seed=3).to_list()
    assert first.features == data.features
    originals = data.to_list()
    added = [row for row in first.to_list() if row not in originals]
    assert len(first) == len(data) + len(added) and len(added) == 6  # round(0.5 * 12); 10 rows qualify
    subs = {s.index: s for s in counterfactual_substitutions(data, fraction=0.5, seed=3)}
    assert len(subs) == 6
    by_id = {row["id"]: row for row in originals}
    for row in added:
        source = by_id[row["id"]]  # every other column is kept: the id says which row it copies
        sub = subs[originals.index(source)]
        assert answer_shape(sub.replacement) == answer_shape(sub.original) == sub.shape
        assert row["answer"] == source["answer"].replace(sub.original, sub.replacement)
        assert row["context"] == source["context"].replace(sub.original, sub.replacement)
        assert sub.replacement not in source["context"] and row["question"] == source["question"]
        if sub.shape == "name":  # a name for a name of as many words, an author for an author
            assert len(sub.replacement.split()) == len(sub.original.split()) and row["id"].startswith("w-")
    assert not any(row["id"] in ("free", "closed") for row in added)  # free text and no context: never copied
    other_seed = {(s.index, s.replacement) for s in counterfactual_substitutions(data, fraction=0.5, seed=4)}
    assert other_seed != {(s.index, s.replacement) for s in subs.values()}
    assert augment_dataset(data, fraction=0.5, seed=3, placement="end").to_list()[:12] == originals


def test_augmentation_rewrites_the_turns_of_conversational_data():
    rows = [{"messages": [{"role": "user", "content": f"{c}\n\n{q}"}, {"role": "assistant", "content": a}]}
            for c, q, a in [("The capital of France is Paris.", "What is the capital of France?", "Paris"),
                            ("The capital of Japan is Tokyo.", "What is the capital of Japan?", "Tokyo")]]
    augmented = augment_dataset(rows, fraction=1.0, seed=0, placement="end")
    assert isinstance(augmented, list) and len(augmented) == 4
    assert augmented[2]["messages"][0]["content"].startswith("The capital of France is Tokyo.")
    assert augmented[2]["messages"][1]["content"] == "Tokyo"


def test_probes_from_qa_are_valid_probes_the_scorer_accepts(tiny_model, tokenizer):
    probes = probes_from_qa(knowledge_rows(), family="mine", seed=0)
    assert len(probes) == 10 and {p.family for p in probes} == {"mine"}
    for probe in probes:
        assert probe.counterfactual_answer in probe.context and probe.parametric_answer in probe.aligned()
        assert probe.counterfactual_answer != probe.parametric_answer
    report = ProbeScorer(probes, tokenizer, "chat").score(tiny_model)
    assert report.metrics["ctx_reliance/mine/num_probes"] == 10
    assert 0.0 <= report.metrics["ctx_reliance/counterfactual_accuracy"] <= 1.0
    assert torch.isfinite(torch.tensor(report.result.scores)).all()
    with pytest.raises(AuditDataError, match="no example can become a probe"):
        probes_from_qa([{"context": "x", "question": "q", "answer": "lower case"}])


def test_the_mitigation_example_knows_the_kind_of_every_demo_example():
    import importlib.util
    import sys
    from pathlib import Path

    from ctx_callback import load_probes

    examples = Path(__file__).resolve().parent.parent / "examples"
    sys.path.insert(0, str(examples))
    try:
        spec = importlib.util.spec_from_file_location("mitigation_smollm2", examples / "mitigation_smollm2.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(examples))
    _, train = module.base.split_probes(load_probes("all"))
    data = module.base.demo_dataset(train, copy_examples=12, memory_examples=30)
    kinds = module.known_kinds(data, train)
    assert kinds[:12] == ["counterfactual"] * 12
    assert {k: kinds[12:].count(k) for k in ("aligned", "unrelated", "no_context")} == {
        "aligned": 10, "unrelated": 10, "no_context": 10}
    examples_, _, name, _ = prepare_examples(data)  # the audit splits the same user turns the same way
    assert name == "messages"
    assert [e.context is None for e in examples_] == [k == "no_context" for k in kinds]
