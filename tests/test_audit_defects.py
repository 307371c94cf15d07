"""User-found defects of the data audit (issue 20, items 4, 5, 8 and 9), each reproduced on real parts: the real
SmolLM2 tokenizer, tiny random Llamas, real files and the real command line.

- item 4: ``ctx-callback audit --out`` never replaces the input by accident, writes the format its extension names,
  keeps every written row exactly as it was in the input, and refuses a bad output or ``--augment`` before the audit;
- item 5: ``filter_dataset`` matches rows by content: a shuffled copy is filtered right, other rows are refused;
- item 8: ``augment_dataset`` on ``messages`` data rewrites only the scored exchange (system turn and earlier turns
  untouched);
- item 9: an empty file is a clear error, numeric answers (years) are audited, and a ``messages`` example is rendered
  with its own system turn.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pytest

from ctx_callback.audit import (
    audit_dataset,
    augment_dataset,
    filter_dataset,
    load_audit_data,
    prepare_examples,
)
from ctx_callback.cli import EXIT_OK, EXIT_USAGE, main
from ctx_callback.cli.audit import AUDIT_JSONL
from ctx_callback.errors import AuditDataError, ConfigurationError
from tests.helpers import make_tiny_llama

COUNTRIES = [("Italy", "Rome"), ("Norway", "Oslo"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi"),
             ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Spain", "Madrid")]


def alpaca_rows() -> list[dict]:
    """Eight capital questions with a context, two without; a ``note`` column only some rows have."""
    rows: list[dict] = []
    for i, (country, capital) in enumerate(COUNTRIES):
        row = {"instruction": f"What is the capital of {country}?", "input": f"The capital of {country} is {capital}.",
               "output": capital, "id": country}
        if i % 3 == 0:
            row["note"] = f"checked {i}"  # present in some rows only
        rows.append(row)
    rows.append({"instruction": "What is the capital of France?", "input": "", "output": "Paris", "id": "France"})
    rows.append({"instruction": "What is the capital of Germany?", "input": "", "output": "Berlin", "id": "Germany"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error_line(stderr: str) -> str:
    """The one error line (progress lines of the data loader may come before it); no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("ctx-callback: error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_defects_model")
    make_tiny_llama(tokenizer, seed=5).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def train_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows())


def audit_cli(data, model_dir, tmp_path, *extra) -> list[str]:
    return ["audit", str(data), "--model", str(model_dir), "--output-dir", str(tmp_path / "audit"), "--no-plot",
            "--quantile", "0.5", *extra]


def flagged_ids(out_dir: Path, rows: list[dict]) -> set[str]:
    records = read_jsonl(out_dir / AUDIT_JSONL)
    return {rows[r["index"]]["id"] for r in records if r["category"] == "non_context_critical"}


# ----------------------------------------------------------------------------------------------------------------
# Item 4: --out
# ----------------------------------------------------------------------------------------------------------------


def test_out_refuses_the_input_file_unless_overwrite(model_dir, train_file, tmp_path, capsys):
    before = train_file.read_bytes()
    code = main(audit_cli(train_file, model_dir, tmp_path, "--out", str(train_file)))
    line = error_line(capsys.readouterr().err)
    assert code == EXIT_USAGE and str(train_file) in line and "--overwrite" in line
    assert train_file.read_bytes() == before  # the training data is untouched
    assert not (tmp_path / "audit").exists()  # refused before the audit
    assert main(audit_cli(train_file, model_dir, tmp_path, "--out", str(train_file), "--overwrite")) == EXIT_OK
    kept = read_jsonl(train_file)
    flagged = flagged_ids(tmp_path / "audit", alpaca_rows())
    assert len(flagged) == 4 and [r["id"] for r in kept] == [r["id"] for r in alpaca_rows() if r["id"] not in flagged]


def test_out_refuses_a_file_inside_the_input_folder(model_dir, tmp_path, capsys):
    folder = tmp_path / "my_data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", alpaca_rows())
    target = folder / "filtered.jsonl"  # the next load of the folder would read it as training data too
    code = main(audit_cli(folder, model_dir, tmp_path, "--out", str(target)))
    line = error_line(capsys.readouterr().err)
    assert code == EXIT_USAGE and str(target) in line and "--overwrite" in line and not target.exists()


def test_out_writes_the_format_its_extension_names_and_rows_keep_their_keys(model_dir, train_file, tmp_path, capsys):
    rows = alpaca_rows()
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        out = tmp_path / f"filtered{suffix}"
        assert main(audit_cli(train_file, model_dir, tmp_path, "--out", str(out))) == EXIT_OK, capsys.readouterr().err
        flagged = flagged_ids(tmp_path / "audit", rows)
        expected = [r for r in rows if r["id"] not in flagged]
        reread = load_audit_data(str(out))  # the file is what its extension says: it loads and audits again
        assert len(reread) == len(expected) and prepare_examples(reread)[2] == "alpaca"
        assert reread["id"] == [r["id"] for r in expected]
        if suffix == ".jsonl":  # a true subset: every row exactly as in the input (no key added, none null-filled)
            assert read_jsonl(out) == expected
        elif suffix == ".json":
            assert json.loads(out.read_text()) == expected
        elif suffix == ".csv":  # one header for every row; a missing value is an empty cell
            with open(out, newline="") as f:
                table = list(csv.DictReader(f))
            assert list(table[0]) == ["instruction", "input", "output", "id", "note"]
            assert [r["note"] for r in table] == [r.get("note", "") for r in expected]
        else:  # columnar: a column some rows lack is null in those rows
            assert reread["note"] == [r.get("note") for r in expected]


def test_an_unknown_out_extension_is_refused_before_the_audit(model_dir, train_file, tmp_path, capsys):
    code = main(audit_cli(train_file, model_dir, tmp_path, "--out", str(tmp_path / "filtered.txt")))
    line = error_line(capsys.readouterr().err)
    assert code == EXIT_USAGE and "filtered.txt" in line
    assert all(ext in line for ext in (".jsonl", ".json", ".csv", ".parquet"))
    assert not (tmp_path / "audit").exists()


def test_nested_columns_cannot_go_to_csv(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": f"The capital of {c} is {a}.\n\nWhat is the capital of {c}?"},
        {"role": "assistant", "content": a}]} for c, a in COUNTRIES[:3]])
    code = main(audit_cli(data, model_dir, tmp_path, "--out", str(tmp_path / "f.csv")))
    line = error_line(capsys.readouterr().err)
    assert code == EXIT_USAGE and "f.csv" in line and "messages" in line and ".jsonl" in line
    assert not (tmp_path / "audit").exists()


def test_an_unwritable_out_and_a_bad_augment_fail_before_the_audit(model_dir, train_file, tmp_path, capsys):
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    unwritable = [str(a_file / "filtered.jsonl")]
    if Path("/proc/self").is_dir():
        unwritable.append("/proc/filtered.jsonl")  # not writable, even for root
    for target in unwritable:
        code = main(audit_cli(train_file, model_dir, tmp_path, "--out", target))
        line = error_line(capsys.readouterr().err)
        assert code == EXIT_USAGE and f"--out {target}" in line and ".tmp" not in line, line
    code = main(audit_cli(train_file, model_dir, tmp_path, "--augment", "11"))
    line = error_line(capsys.readouterr().err)
    assert code == EXIT_USAGE and "--augment 11" in line and "10" in line
    code = main(audit_cli(train_file, model_dir, tmp_path, "--augment", "0.5", "--augmented-out", unwritable[0]))
    line = error_line(capsys.readouterr().err)
    assert code == EXIT_USAGE and f"--augmented-out {unwritable[0]}" in line
    assert not (tmp_path / "audit").exists()  # every one refused before the audit ran


# ----------------------------------------------------------------------------------------------------------------
# Item 5: filter_dataset matches rows by content
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audited(tokenizer):
    data = datasets.Dataset.from_list([{"context": f"The capital of {c} is {a}.", "question": f"Capital of {c}?",
                                        "answer": a, "id": c} for c, a in COUNTRIES])
    result = audit_dataset(data, make_tiny_llama(tokenizer, seed=2), tokenizer, data_format="qa",
                           prompt_format="plain", quantile=0.5)
    return data, result


def test_filter_drops_exactly_the_flagged_rows_of_a_shuffled_dataset(audited):
    data, result = audited
    flagged = {data[i]["id"] for i in result.indices("non_context_critical")}
    assert len(flagged) == 4
    for shuffled in (data.shuffle(seed=1), list(reversed(data.to_list()))):
        kept = filter_dataset(shuffled, result)
        assert sorted(row["id"] for row in kept) == sorted(set(data["id"]) - flagged)
        weighted = filter_dataset(shuffled, result, weight_column="w")
        assert {row["id"]: row["w"] for row in weighted} == {c: 0.0 if c in flagged else 1.0 for c in data["id"]}


def test_filter_refuses_a_dataset_with_other_rows(audited):
    data, result = audited
    edited = data.map(lambda row, i: {"answer": "Milan"} if i == 3 else {}, with_indices=True)
    with pytest.raises(ConfigurationError) as err:
        filter_dataset(edited, result)
    message = str(err.value)
    assert "row 3" in message and "pass the dataset that was audited" in message and "shuffled" in message
    with pytest.raises(ConfigurationError, match="pass the dataset that was audited"):
        filter_dataset(data.select(range(5)), result)


def test_a_result_without_row_keys_is_matched_by_position(audited):
    """Results built before the row key existed (or by hand) keep the old behaviour: same length, same order."""
    data, result = audited
    old = type(result)([{k: v for k, v in r.items() if k != "row_key"} for r in result.records], result.rule,
                       result.cutoff, {k: v for k, v in result.settings.items() if k != "key_columns"})
    assert filter_dataset(data, old)["id"] == filter_dataset(data, result)["id"]


# ----------------------------------------------------------------------------------------------------------------
# Item 8: augmentation of conversational data rewrites only the scored exchange
# ----------------------------------------------------------------------------------------------------------------


def test_augment_messages_rewrites_only_the_scored_exchange():
    system = {"role": "system", "content": "Fun fact: Paris hosted the 2020 Olympics, not Tokyo or Rome."}
    rows = []
    for country, capital in [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome")]:
        earlier = [{"role": "user", "content": f"Is {capital} big?"},
                   {"role": "assistant", "content": f"{capital}: yes."}]
        rows.append({"messages": [system, *earlier,
                                  {"role": "user", "content": f"The capital of {country} is {capital}.\n\n"
                                                              f"What is the capital of {country}?"},
                                  {"role": "assistant", "content": capital}]})
    augmented = augment_dataset(rows, fraction=1.0, seed=0, placement="end")
    assert len(augmented) == 6
    for source, copy in zip(rows, augmented[3:]):
        before, after = source["messages"], copy["messages"]
        assert after[:3] == before[:3]  # the system turn and the earlier exchange are untouched
        old, new = before[-1]["content"], after[-1]["content"]
        assert new != old and after[-2]["content"] == before[-2]["content"].replace(old, new, 1)
        assert after[-2]["content"].endswith(before[-2]["content"].split("\n\n")[1])  # the question unchanged


def test_augment_conversational_prompt_completion_keeps_the_system_turn():
    system = {"role": "system", "content": "Fun fact: Paris and Tokyo are big."}
    rows = [{"prompt": [system, {"role": "user", "content": f"The capital of {c} is {a}.\n\nCapital of {c}?"}],
             "completion": [{"role": "assistant", "content": a}], "context": f"The capital of {c} is {a}."}
            for c, a in [("France", "Paris"), ("Japan", "Tokyo")]]
    augmented = augment_dataset(rows, fraction=1.0, seed=0, placement="end")
    for source, copy in zip(rows, augmented[2:]):
        assert copy["prompt"][0] == system
        old, new = source["completion"][0]["content"], copy["completion"][0]["content"]
        assert new != old and copy["context"] == source["context"].replace(old, new)
        assert copy["prompt"][1]["content"] == source["prompt"][1]["content"].replace(old, new, 1)


# ----------------------------------------------------------------------------------------------------------------
# Item 9: empty files, numeric answers, the data's own system turn
# ----------------------------------------------------------------------------------------------------------------


def test_an_empty_file_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    header_only = tmp_path / "header.csv"
    header_only.write_text("context,question,answer\n")
    for path in (empty, header_only):
        with pytest.raises(AuditDataError, match="no rows"):
            load_audit_data(str(path))
        assert main(["audit", str(path), "--model", str(tmp_path / "no_model")]) == EXIT_USAGE
        line = error_line(capsys.readouterr().err)
        assert str(path) in line and "no rows" in line and "StopIteration" not in line


def test_year_answers_are_audited_from_the_command_line(model_dir, tmp_path, capsys):
    events = [("the Moon landing", 1969), ("the fall of the Berlin Wall", 1989), ("the first World Cup", 1930),
              ("the end of World War II", 1945)]
    rows = [{"context": f"{e.capitalize()} happened in {y}.", "question": f"When was {e}?", "answer": y}
            for e, y in events]
    data = write_jsonl(tmp_path / "years.jsonl", rows)
    out = tmp_path / "kept.jsonl"
    assert main(audit_cli(data, model_dir, tmp_path, "--out", str(out))) == EXIT_OK, capsys.readouterr().err
    records = read_jsonl(tmp_path / "audit" / AUDIT_JSONL)
    assert len(records) == 4 and all(r["nll_without_context"] is not None for r in records)
    assert all(isinstance(r["answer"], int) for r in read_jsonl(out))  # written back as the numbers they were
    examples = prepare_examples(load_audit_data(str(data)))[0]
    assert [e.answer for e in examples] == ["1969", "1989", "1930", "1945"]
    assert prepare_examples([{"context": "c", "question": "q", "answer": 2.0}])[0][0].answer == "2"
    with pytest.raises(AuditDataError, match="must be a string or a number, got bool"):
        prepare_examples([{"context": "c", "question": "q", "answer": True}])
    augmented = augment_dataset(rows, fraction=1.0, seed=0, placement="end")
    assert all(isinstance(r["answer"], int) and str(r["answer"]) in r["context"] for r in augmented[4:])


def test_a_messages_example_is_rendered_with_its_own_system_turn(tokenizer):
    model = make_tiny_llama(tokenizer, seed=3)
    qa = [{"context": f"The capital of {c} is {a}.", "question": f"What is the capital of {c}?", "answer": a}
          for c, a in COUNTRIES[:3]]
    messages = [{"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": f"{r['context']}\n\n{r['question']}"},
                              {"role": "assistant", "content": r["answer"]}]} for r in qa]
    fields = ("nll_with_context", "nll_without_context", "prompt_tokens")
    own = audit_dataset(messages, model, tokenizer)
    with_system = audit_dataset(qa, model, tokenizer, data_format="qa", prompt_format="chat", system_prompt="Be brief.")
    default = audit_dataset(qa, model, tokenizer, data_format="qa", prompt_format="chat")  # SmolLM2's own system prompt
    for a, b, c in zip(own.records, with_system.records, default.records):
        assert [a[f] for f in fields] == [b[f] for f in fields]
        assert a["prompt_tokens"] < c["prompt_tokens"]  # "Be brief." is shorter than SmolLM2's default
    # system_prompt= is for the rows without a system turn; a row's own turn wins
    mixed = [messages[0], {"messages": messages[1]["messages"][1:]}]
    result = audit_dataset(mixed, model, tokenizer, system_prompt="Answer with one word only, please.")
    assert result.records[0]["prompt_tokens"] == own.records[0]["prompt_tokens"]
    assert own.records[1]["prompt_tokens"] < result.records[1]["prompt_tokens"] < default.records[1]["prompt_tokens"]
    assert result.settings["examples_with_system_turn"] == 1


def test_a_changed_system_turn_is_scored_again_on_resume(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer, seed=3)

    def rows(system):
        return [{"messages": [{"role": "system", "content": system},
                              {"role": "user", "content": f"The capital of {c} is {a}.\n\nWhat is the capital of {c}?"},
                              {"role": "assistant", "content": a}]} for c, a in COUNTRIES[:2]]

    resume = tmp_path / "scores.jsonl"
    first = audit_dataset(rows("Be brief."), model, tokenizer, resume_file=resume)
    assert audit_dataset(rows("Be brief."), model, tokenizer, resume_file=resume).scored_now == 0
    changed = audit_dataset(rows("Answer with one word only, please."), model, tokenizer, resume_file=resume)
    assert changed.scored_now == 2  # the cached scores were made with another system prompt
    assert changed.records[0]["prompt_tokens"] > first.records[0]["prompt_tokens"]
