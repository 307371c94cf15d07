"""The parts load_probes is made of, each on its own: probe_schema, probe_records and probe_sources.

test_probes.py checks load_probes end to end; these tests pin down what each part does, so that one can be read,
changed or replaced without the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctx_callback import probes as probes_module
from ctx_callback.errors import ConfigurationError, ProbeFormatError, ProbeSourceError
from ctx_callback.probe_records import MAPPABLE_FIELDS, probes_from_records
from ctx_callback.probe_schema import REQUIRED_FIELDS, Probe, record_location, validated_probe
from ctx_callback.probe_sources import (
    BUILTIN_SUITES,
    SOURCE_KINDS,
    ProbeRequest,
    read_json_file,
    read_probe_source,
    source_kind,
)
from tests.helpers import capital_records


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# -- probe_schema ------------------------------------------------------------------------------------------------


def test_record_location_names_the_parts_that_are_known():
    assert record_location("p.jsonl", 3, "q1") == "p.jsonl, line 3, probe 'q1'"
    assert record_location("p.jsonl", None, "q1") == "p.jsonl, probe 'q1'"
    assert record_location("<records>", None, None) == "<records>"


def test_validated_probe_builds_and_strips_a_native_record():
    record = {**capital_records(1)[0], "question": "  What is the capital of France?  ", "family": " ",
              "counterfactual_aliases": "lyon", "metadata": {"k": 1}}
    probe = validated_probe(record, source="s", line=2, default_id="s/0")
    assert probe == Probe(id="capitals/france", family="default", context="The capital of France is Lyon.",
                          question="What is the capital of France?", counterfactual_answer="Lyon",
                          parametric_answer="Paris", counterfactual_aliases=("lyon",), metadata={"k": 1})
    no_id = {key: value for key, value in record.items() if key != "id"}
    assert validated_probe(no_id, source="s", line=None, default_id="s/7").id == "s/7"


def test_validated_probe_names_the_source_line_probe_and_field():
    record = capital_records(1)[0]
    with pytest.raises(ProbeFormatError, match=r"^s, line 4, probe 'capitals/france': missing required field "
                                               "'question'"):
        validated_probe({k: v for k, v in record.items() if k != "question"}, source="s", line=4, default_id="x")
    with pytest.raises(ProbeFormatError, match="are identical"):
        validated_probe({**record, "counterfactual_answer": "paris"}, source="s", line=None, default_id="x")


def test_validated_probe_matches_answers_to_options():
    record = {**capital_records(1)[0], "options": ["Paris", "Lyon", "Nice"], "counterfactual_answer": "lyon."}
    probe = validated_probe(record, source="s", line=None, default_id="x")
    assert probe.options == ("Paris", "Lyon", "Nice") and probe.counterfactual_answer == "Lyon"
    assert (probe.counterfactual_index, probe.parametric_index) == (1, 0)
    with pytest.raises(ProbeFormatError, match="is not one of the options"):
        validated_probe({**record, "counterfactual_answer": "Marseille"}, source="s", line=None, default_id="x")


def test_required_fields():
    assert REQUIRED_FIELDS == ("context", "question", "counterfactual_answer", "parametric_answer")
    assert set(REQUIRED_FIELDS) <= MAPPABLE_FIELDS


# -- probe_records -----------------------------------------------------------------------------------------------


def test_probes_from_records_detects_converts_and_validates():
    nq = [{"question": "q?", "sub_context": "It is A.", "sub_answer": ["A", "a"], "org_answer": "B"}]
    (probe,) = probes_from_records(nq, source="mini.jsonl")
    assert (probe.id, probe.family, probe.counterfactual_aliases) == ("mini/0", "nq_swap", ("a",))
    (probe,) = probes_from_records(nq, source="mini.jsonl", id_prefix="swap")
    assert probe.id == "swap/0"


def test_probes_from_records_checks_format_and_mapping_before_any_record():
    with pytest.raises(ConfigurationError, match=r"^Unknown probe format 'csv'; expected one of \['ctx_callback'"):
        probes_from_records([], format="csv")
    with pytest.raises(ConfigurationError, match="needs column_mapping"):
        probes_from_records([], format="columns")
    with pytest.raises(ConfigurationError, match=r"unknown target fields \['answer'\]"):
        probes_from_records([], column_mapping={"answer": "a"})
    with pytest.raises(ConfigurationError, match=r"must map the required fields \['parametric_answer'\]"):
        probes_from_records([], column_mapping={"context": "c", "question": "q", "counterfactual_answer": "a"})
    mapping = {"context": "c", "question": "q", "counterfactual_answer": "a", "options": "o"}  # options: no parametric
    assert probes_from_records([], column_mapping=mapping) == []


def test_probes_from_records_refuses_duplicate_ids_with_both_places():
    rows = capital_records(2)
    rows[1]["id"] = rows[0]["id"]
    with pytest.raises(ProbeFormatError, match=r"f.jsonl, line 9, probe 'capitals/france': duplicate probe id "
                                               r"\(first seen at line 7\)"):
        probes_from_records(rows, source="f.jsonl", line_numbers=[7, 9])


# -- probe_sources -----------------------------------------------------------------------------------------------


def kind_name(source, **options) -> str:
    return source_kind(ProbeRequest(source, **options)).name


def test_each_source_goes_to_its_kind(tmp_path):
    folder = tmp_path / "probes"
    folder.mkdir()
    file = write_jsonl(folder / "a.jsonl", capital_records(2))
    assert kind_name(capital_records(2)) == "records"
    assert kind_name("world_facts", from_hub=True) == "Hub dataset (from_hub=True)"
    assert kind_name("world_facts+nq_swap") == "built-in suites and presets"
    assert kind_name("all") == "built-in suites and presets"
    assert kind_name(folder) == "local folder"
    assert kind_name(str(file)) == "local file"
    assert kind_name(str(tmp_path / "nope.jsonl")) == "missing file"
    assert kind_name("./nope") == "missing file"
    assert kind_name("org/name") == "Hub dataset id"
    assert kind_name("world_fact") == "unknown name"
    assert [kind.name for kind in SOURCE_KINDS][-1] == "unknown name"


def test_a_file_named_like_a_suite_is_read_as_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "quotes", capital_records(1))
    assert kind_name("quotes") == "local file"
    assert [p.id for p in read_probe_source(ProbeRequest("quotes"))] == ["capitals/france"]


def test_request_names_expand_groups_once_in_order():
    assert ProbeRequest("quotes+all").names == ("quotes", *[s for s in BUILTIN_SUITES if s != "quotes"])
    assert ProbeRequest("nq_swap+world_facts+nq_swap").names == ("nq_swap", "world_facts")


def test_suites_and_presets_refuse_a_format():
    with pytest.raises(ConfigurationError, match="know their own format"):
        read_probe_source(ProbeRequest("world_facts", format="paper"))


def test_unknown_names_and_missing_files_are_refused_with_what_exists(tmp_path):
    with pytest.raises(ProbeSourceError, match=r"Unknown probe suite 'world_fact'. Built-in suites: \['world_facts'"):
        read_probe_source(ProbeRequest("world_fact"))
    with pytest.raises(ProbeSourceError, match="does not exist"):
        read_probe_source(ProbeRequest(str(tmp_path / "nope.jsonl")))


def test_a_folder_is_read_file_by_file_with_ids_unique_across_files(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", capital_records(2))
    write_jsonl(tmp_path / "a.jsonl", capital_records(3)[2:])
    got = read_probe_source(ProbeRequest(tmp_path))
    assert [p.id for p in got] == ["capitals/italy", "capitals/france", "capitals/japan"]  # by file name
    write_jsonl(tmp_path / "c.jsonl", capital_records(1))
    with pytest.raises(ProbeFormatError, match="duplicate probe id 'capitals/france' across files"):
        read_probe_source(ProbeRequest(tmp_path))


def test_read_json_file_reads_arrays_wrappers_and_lines(tmp_path):
    rows = capital_records(2)
    (tmp_path / "a.json").write_text(json.dumps({"data": rows}))
    assert read_json_file(tmp_path / "a.json") == (rows, None)
    (tmp_path / "b.jsonl").write_text("\ufeff" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert read_json_file(tmp_path / "b.jsonl") == (rows, [1, 3])
    (tmp_path / "c.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ProbeFormatError, match=r"c.jsonl, line 2: malformed JSON line"):
        read_json_file(tmp_path / "c.jsonl")


def test_load_probes_names_stay_importable_from_probes():
    for name in probes_module.__all__:
        assert getattr(probes_module, name) is not None
    assert probes_module.Probe is Probe and probes_module.probes_from_records is probes_from_records


def test_an_empty_folder_is_refused_with_what_a_folder_must_hold(tmp_path):
    # A folder with neither JSON files nor a dataset snapshot used to go to datasets.load_dataset (the snapshot test
    # asked whether a generator existed, which is always true) and failed there with datasets' own message.
    (tmp_path / "notes.txt").write_text("not probes")
    with pytest.raises(ProbeSourceError, match=r"contains no \.json or \.jsonl files \(nor a dataset snapshot"):
        probes_module.load_probes(str(tmp_path))
