"""Probe schema, validation errors, built-in suites and public-format loaders (on local fixture files)."""

from __future__ import annotations

import json

import pytest

from ctx_callback import BUILTIN_SUITES, ProbeFormatError, load_probes, probes_from_records
from tests.helpers import capital_records


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- built-in suites -------------------------------------------------------------------------------------------


def test_builtin_suites_are_large_valid_and_diverse():
    probes = load_probes("all")
    families = {f: [p for p in probes if p.family == f] for f in BUILTIN_SUITES}
    assert len(probes) >= 300
    for family, items in families.items():
        assert len(items) >= 100, family
        for p in items:
            assert p.counterfactual_answer.lower() in p.context.lower(), p.id
            assert p.parametric_answer.lower() not in p.context.lower(), p.id
            aligned = p.aligned()
            assert aligned is not None and p.parametric_answer.lower() in aligned.lower(), p.id
    relations = {p.metadata.get("relation") for p in families["world_facts"]}
    assert len(relations) >= 4  # capitals and other stable facts


def test_builtin_suite_selection_and_limit():
    wf = load_probes("world_facts")
    assert {p.family for p in wf} == {"world_facts"}
    both = load_probes("world_facts+quotes")
    assert {p.family for p in both} == {"world_facts", "quotes"}
    limited = load_probes("all", limit_per_family=10)
    assert len(limited) == 30
    # spread evenly: the world_facts subset covers more than one relation
    assert len({p.metadata.get("relation") for p in limited if p.family == "world_facts"}) > 1


def test_unknown_suite_names_the_options():
    with pytest.raises(ValueError, match="Unknown probe suite 'world_fact'.*world_facts"):
        load_probes("world_fact")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_probes(str(tmp_path / "nope.jsonl"))


# -- bad input: one clear error naming file, line/probe and field -------------------------------------------------


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.pop("question"), r"line 2, probe 'capitals/japan': missing required field 'question'"),
        (lambda r: r.update(parametric_answer="  "),
         r"line 2, probe 'capitals/japan': field 'parametric_answer' is empty"),
        (lambda r: r.update(parametric_answer="osaka"), r"line 2, probe 'capitals/japan': .*identical"),
        (lambda r: r.update(context=42), r"line 2, probe 'capitals/japan': field 'context' must be a string, got int"),
    ],
)
def test_bad_records_name_file_line_probe_and_field(tmp_path, mutate, match):
    rows = capital_records(3)
    mutate(rows[1])
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ProbeFormatError, match=match) as info:
        load_probes(str(path))
    assert "bad.jsonl" in str(info.value)


def test_malformed_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(capital_records(1)[0]) + "\n\n{not json}\n")
    with pytest.raises(ProbeFormatError, match=r"broken.jsonl, line 3: malformed JSON line"):
        load_probes(str(path))


def test_duplicate_ids(tmp_path):
    rows = capital_records(2)
    rows[1]["id"] = rows[0]["id"]
    with pytest.raises(ProbeFormatError, match="duplicate probe id"):
        load_probes(str(write_jsonl(tmp_path / "dup.jsonl", rows)))


def test_undetectable_format_explains_column_mapping():
    with pytest.raises(ProbeFormatError, match="column_mapping"):
        probes_from_records([{"passage": "x", "q": "y"}])


# -- public formats ---------------------------------------------------------------------------------------------


def test_paper_json_array_and_jsonl(tmp_path):
    rows = [
        {"context": "The capital of France is Lyon.", "question": "What is the capital of France?",
         "answer": "Lyon", "memory_answer": "Paris"},
        {"context": "Gold has the symbol Ag.", "question": "What is the symbol of gold?",
         "answer": ["Ag", "ag"], "parametric_answer": "Au"},
    ]
    (tmp_path / "paper.json").write_text(json.dumps(rows))
    arr = load_probes(str(tmp_path / "paper.json"))
    jsonl = load_probes(str(write_jsonl(tmp_path / "paper.jsonl", rows)))
    for probes in (arr, jsonl):
        assert [p.counterfactual_answer for p in probes] == ["Lyon", "Ag"]
        assert [p.parametric_answer for p in probes] == ["Paris", "Au"]
        assert probes[1].counterfactual_aliases == ("ag",)
    assert arr[0].id == "paper/0"


def test_nq_swap_with_list_answers_and_original_context(tmp_path):
    row = {"question": "who wrote hamlet", "sub_context": "Hamlet was written by Charles Dickens.",
           "org_context": "Hamlet was written by William Shakespeare.", "sub_answer": ["Charles Dickens", "Dickens"],
           "org_answer": ["William Shakespeare", "Shakespeare"]}
    (probe,) = load_probes(str(write_jsonl(tmp_path / "nqswap.jsonl", [row])))
    assert probe.family == "nq_swap"
    assert probe.counterfactual_answer == "Charles Dickens" and probe.counterfactual_aliases == ("Dickens",)
    assert probe.parametric_aliases == ("Shakespeare",)
    assert probe.aligned() == "Hamlet was written by William Shakespeare."


def test_memotrap(tmp_path):
    row = {"prompt": 'Write a quote that ends in the word "early": Better late than',
           "classes": [" never.", " early."], "answer_index": 1}
    (probe,) = load_probes(str(write_jsonl(tmp_path / "memotrap.jsonl", [row])))
    assert probe.context == 'Write a quote that ends in the word "early":'
    assert probe.question == "Better late than"
    assert (probe.counterfactual_answer, probe.parametric_answer) == ("early", "never")
    bad = dict(row, answer_index=2)
    with pytest.raises(ProbeFormatError, match="answer_index"):
        load_probes(str(write_jsonl(tmp_path / "bad.jsonl", [bad])))


def test_column_mapping(tmp_path):
    rows = [{"passage": "The capital of Peru is Cusco.", "q": "Capital of Peru?", "new": "Cusco", "old": "Lima",
             "topic": "geo"}]
    mapping = {"context": "passage", "question": "q", "counterfactual_answer": "new", "parametric_answer": "old",
               "family": "topic"}
    (probe,) = load_probes(str(write_jsonl(tmp_path / "x.jsonl", rows)), column_mapping=mapping)
    assert (probe.family, probe.counterfactual_answer, probe.parametric_answer) == ("geo", "Cusco", "Lima")
    with pytest.raises(ValueError, match="required fields"):
        load_probes(str(tmp_path / "x.jsonl"), column_mapping={"context": "passage"})
    with pytest.raises(ProbeFormatError, match="column 'new2'"):
        load_probes(str(tmp_path / "x.jsonl"), column_mapping={**mapping, "counterfactual_answer": "new2"})


def test_hub_loader_through_datasets_on_a_local_dataset(tmp_path):
    """The Hub path (datasets.load_dataset) exercised on a local dataset folder: no network needed."""
    repo = tmp_path / "org" / "nq_swap_mini"
    repo.mkdir(parents=True)
    rows = [{"question": f"q{i}", "sub_context": f"ctx says A{i}", "sub_answer": [f"A{i}"], "org_answer": [f"B{i}"]}
            for i in range(4)]
    write_jsonl(repo / "train.jsonl", rows)
    probes = load_probes(str(repo), from_hub=True)
    assert [p.counterfactual_answer for p in probes] == ["A0", "A1", "A2", "A3"]
    assert all(p.family == "nq_swap" for p in probes)


def test_datasets_object_and_probe_list():
    import datasets

    ds = datasets.Dataset.from_list(capital_records(3))
    probes = load_probes(ds)
    assert [p.id for p in probes] == ["capitals/france", "capitals/japan", "capitals/italy"]
    assert load_probes(probes) == probes


def test_families_filter():
    with pytest.raises(ValueError, match="available families"):
        load_probes("world_facts", families=["nope"])
