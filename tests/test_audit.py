"""The data audit (``ctx_callback.audit``): scores, categories, rules, resume, on a real tokenizer and tiny real models.

The category tests train a tiny Llama for a few dozen steps on closed-book capital questions, so that it *knows*
those facts; then an aligned-context example (the context repeats the known capital) must come out
non-context-critical and a counterfactual-context example (the context is the only source of its answer)
context-critical.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from ctx_callback.audit import AuditRule, audit_dataset, resolve_rule
from ctx_callback.audit.rules import statistic_value
from ctx_callback.audit.scoring import WITH, WITHOUT, encode_example
from ctx_callback.errors import ConfigurationError
from ctx_callback.formatting import resolve_prompt_format
from tests.helpers import CAPITALS, make_tiny_llama

PLAIN = "plain"


def qa_rows() -> tuple[list[dict], list[str]]:
    """Aligned, counterfactual and closed-book examples over the capitals, with their known kinds."""
    rows, kinds = [], []
    for country, true, fake in CAPITALS:
        question = f"What is the capital of {country}?"
        rows.append({"context": f"The capital of {country} is {true}.", "question": question, "answer": true})
        kinds.append("aligned")
        rows.append({"context": f"The capital of {country} is {fake}.", "question": question, "answer": fake})
        kinds.append("counterfactual")
        rows.append({"context": "", "question": question, "answer": true})
        kinds.append("closed_book")
    return rows, kinds


@pytest.fixture(scope="module")
def knowing_model(tokenizer):
    """A tiny Llama trained for 25 steps (plain prompt format) on the closed-book capital questions: it now knows
    them (their no-context NLL falls from about 11 to about 2.3 nats, a fake capital's stays above 15)."""
    model = make_tiny_llama(tokenizer, seed=1, hidden_size=64, intermediate_size=128)
    fmt = resolve_prompt_format(PLAIN, tokenizer)
    texts = [fmt.prompt(None, f"What is the capital of {country}?") + fmt.continuation(None, "", true)
             for country, true, _ in CAPITALS]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(25):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 1.5, f"the tiny model did not learn the facts (loss {loss.item():.3f})"
    return model


def naive_logprob(model, prompt_ids, target_ids) -> float:
    """One plain forward pass over prompt + target, the target's summed log-probability."""
    ids = torch.tensor([list(prompt_ids) + list(target_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    p = len(prompt_ids)
    return float(sum(logp[p - 1 + i, t] for i, t in enumerate(target_ids)))


# ----------------------------------------------------------------------------------------------------------------
# Categories on a model that knows the facts
# ----------------------------------------------------------------------------------------------------------------


def test_known_facts_are_non_context_critical_and_context_only_answers_are_critical(knowing_model, tokenizer):
    rows, kinds = qa_rows()
    result = audit_dataset(rows, knowing_model, tokenizer, data_format="qa", prompt_format=PLAIN, quantile=0.5)
    by_kind = {kind: [c for c, k in zip(result.categories, kinds) if k == kind] for kind in set(kinds)}
    assert set(by_kind["closed_book"]) == {"parametric"}
    # 14 context examples, the lowest half flagged: exactly the 7 whose answer the model knows.
    assert by_kind["aligned"] == ["non_context_critical"] * len(CAPITALS)
    assert by_kind["counterfactual"] == ["context_critical"] * len(CAPITALS)
    for record, kind in zip(result.records, kinds):
        if kind == "counterfactual":  # the fake capital is far less likely without the context than the true one
            aligned = result.records[record["index"] - 1]
            assert record["nll_without_context"] > aligned["nll_without_context"] + 1.0
    summary = result.summary
    assert summary["counts"]["non_context_critical"] == 7 and summary["counts"]["parametric"] == 7
    assert summary["rule"]["statistic"] == "nll_without_sum" and summary["rule"]["quantile"] == 0.5
    assert summary["cutoff"] == max(r["nll_without_context_sum"] for r, k in zip(result.records, kinds)
                                    if k == "aligned")
    assert summary["max_target_tokens"] == 64
    assert "lowest 50% of nll_without_sum" in result.table()


def test_default_rule_flags_a_quarter_and_the_paper_rule_is_available_by_name(knowing_model, tokenizer):
    rows, kinds = qa_rows()
    result = audit_dataset(rows, knowing_model, tokenizer, data_format="qa", prompt_format=PLAIN)
    flagged = [k for k, c in zip(kinds, result.categories) if c == "non_context_critical"]
    assert len(flagged) == round(0.25 * 14) and set(flagged) == {"aligned"}
    paper = result.recategorize("paper")
    assert paper.rule.statistic == "nll_without_mean" and paper.rule.name == "paper"
    assert {k for k, c in zip(kinds, paper.categories) if c == "non_context_critical"} == {"aligned"}
    gain = result.recategorize("default", statistic="context_gain_sum", quantile=0.5)
    assert gain.rule.statistic == "context_gain_sum"
    # a threshold rule: everything the model predicts with a summed NLL below the cut is flagged
    cut = result.recategorize(threshold=1e9)
    assert cut.counts()["non_context_critical"] == 14 and cut.cutoff == 1e9


def test_scores_equal_a_naive_forward_pass_and_targets_are_cut(knowing_model, tokenizer):
    rows = [{"context": "Some passage about Paris and Rome.", "question": "Name two cities.",
             "answer": "Paris and Rome, then Berlin, Madrid and Lisbon."},
            {"context": "", "question": "What is the capital of Japan?", "answer": "Tokyo"}]
    result = audit_dataset(rows, knowing_model, tokenizer, data_format="qa", prompt_format=PLAIN, max_target_tokens=3)
    fmt = resolve_prompt_format(PLAIN, tokenizer)
    for row, record in zip(rows, result.records):
        from ctx_callback.audit.adapters import AuditExample

        enc = encode_example(AuditExample(record["index"], row["context"] or None, row["question"], row["answer"]),
                             tokenizer, fmt, 3)
        want = naive_logprob(knowing_model, enc.prompts[WITHOUT], enc.targets[WITHOUT])
        assert record["logprob_without"] == pytest.approx(want, abs=1e-4)
        assert record["nll_without_context"] == pytest.approx(-want / len(enc.targets[WITHOUT]), abs=1e-4)
        if row["context"]:
            with_ctx = naive_logprob(knowing_model, enc.prompts[WITH], enc.targets[WITH])
            assert record["logprob_with"] == pytest.approx(with_ctx, abs=1e-4)
            assert record["context_gain"] == pytest.approx(
                record["nll_without_context"] - record["nll_with_context"])
    long, short = result.records
    assert long["scored_tokens"] == 3 and long["truncated"] and long["target_tokens"] > 3
    assert not short["truncated"] and short["scored_tokens"] == short["target_tokens"]
    assert result.summary["truncated_targets"] == 1


def test_bfloat16_audit_is_close_to_fp32(knowing_model, tokenizer):
    rows, _ = qa_rows()
    fp32 = audit_dataset(rows, knowing_model, tokenizer, data_format="qa", prompt_format=PLAIN)
    bf16 = audit_dataset(rows, knowing_model, tokenizer, data_format="qa", prompt_format=PLAIN, probe_dtype="bfloat16")
    assert bf16.settings["probe_dtype"] == "bfloat16"
    diffs = [abs(a["nll_without_context"] - b["nll_without_context"]) for a, b in zip(fp32.records, bf16.records)]
    assert max(diffs) < 0.25 and max(diffs) > 0  # bf16 arithmetic happened, and stayed close
    # Categories agree wherever rounding cannot decide them. The cut is an order statistic of the rule's statistic,
    # so it moves by at most the largest change of any statistic: an example farther than twice that from the fp32
    # cut-off keeps its category. (Examples at the cut may flip: which ones depends on the CPU and thread count.)
    statistic = fp32.rule.statistic
    values = [(statistic_value(a, statistic), statistic_value(b, statistic))
              for a, b in zip(fp32.records, bf16.records)]
    moved = max(abs(a - b) for a, b in values if a is not None)
    assert bf16.cutoff == pytest.approx(fp32.cutoff, abs=moved)
    decided = [i for i, (a, _) in enumerate(values) if a is None or abs(a - fp32.cutoff) > 2 * moved]
    assert len(decided) >= 0.75 * len(values), (moved, fp32.cutoff)  # the check covers most examples
    assert [fp32.records[i]["category"] for i in decided] == [bf16.records[i]["category"] for i in decided]


def test_chat_format_and_every_engine_agree(tiny_model, tokenizer):
    rows, _ = qa_rows()
    results = {engine: audit_dataset(rows[:9], tiny_model, tokenizer, data_format="qa", engine=engine)
               for engine in ("auto", "batched", "simple")}
    for engine in ("batched", "simple"):
        for a, b in zip(results["auto"].records, results[engine].records):
            assert a["logprob_without"] == pytest.approx(b["logprob_without"], abs=1e-4)
            if a["logprob_with"] is not None:
                assert a["logprob_with"] == pytest.approx(b["logprob_with"], abs=1e-4)
    assert results["auto"].settings["prompt_format"] == "chat"


# ----------------------------------------------------------------------------------------------------------------
# Too long, resume
# ----------------------------------------------------------------------------------------------------------------


def test_too_long_examples_are_counted_reported_and_never_dropped(tiny_model, tokenizer, caplog):
    rows, _ = qa_rows()
    rows = rows[:6] + [{"context": "word " * 300, "question": "What?", "answer": "Paris"}]
    with caplog.at_level(logging.WARNING):
        result = audit_dataset(rows, tiny_model, tokenizer, data_format="qa", prompt_format=PLAIN, max_length=200)
    assert result.records[6]["category"] == "too_long" and result.records[6]["logprob_with"] is None
    assert result.summary["too_long"] == 1 and result.summary["too_long_indices"] == [6]
    assert "1 example(s) are longer than the model's 200 tokens" in caplog.text and "[6]" in caplog.text
    from ctx_callback.audit import filter_dataset

    assert len(filter_dataset(rows, result)) == 7 - result.counts()["non_context_critical"]


def test_an_interrupted_audit_resumes_where_it_stopped(tiny_model, tokenizer, tmp_path):
    rows, _ = qa_rows()
    resume = tmp_path / "scores.jsonl"
    calls = {"n": 0}

    def stop_after_two_chunks(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt

    # the batched engine makes one forward call per chunk here: two chunks of 4 examples get scored
    handle = tiny_model.register_forward_pre_hook(stop_after_two_chunks, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        audit_dataset(rows, tiny_model, tokenizer, data_format="qa", prompt_format=PLAIN, engine="batched",
                      chunk_size=4, resume_file=resume)
    handle.remove()
    lines = resume.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "ctx_callback.audit_scores/1" and len(lines) == 1 + 8
    with open(resume, "a") as f:
        f.write('{"key": "torn')  # a line cut off by the kill
    result = audit_dataset(rows, tiny_model, tokenizer, data_format="qa", prompt_format=PLAIN, engine="batched",
                           chunk_size=4, resume_file=resume)
    assert result.scored_now == len(rows) - 8
    fresh = audit_dataset(rows, tiny_model, tokenizer, data_format="qa", prompt_format=PLAIN, engine="batched")
    for a, b in zip(result.records, fresh.records):
        assert a["category"] == b["category"]
        assert (a["logprob_without"] is None) == (b["logprob_without"] is None)
        assert a["logprob_without"] == pytest.approx(b["logprob_without"], abs=1e-5)
    again = audit_dataset(rows, tiny_model, tokenizer, data_format="qa", prompt_format=PLAIN, engine="batched",
                          resume_file=resume)
    assert again.scored_now == 0 and again.categories == fresh.categories
    # other settings (another target cut) do not reuse the scores
    other = audit_dataset(rows, tiny_model, tokenizer, data_format="qa", prompt_format=PLAIN, engine="batched",
                          resume_file=resume, max_target_tokens=1)
    assert other.scored_now == len(rows)


def test_a_chunk_only_partly_in_the_resume_file_is_rescored_with_its_batch_mates(tiny_model, tokenizer, tmp_path):
    """Resumed == uninterrupted, exactly: an example's float sums depend on its batch-mates (padding, batch shape,
    the CPU's vector width), so a torn chunk is scored again in full, never its missing rows alone."""
    rows, _ = qa_rows()
    resume = tmp_path / "scores.jsonl"
    settings = dict(data_format="qa", prompt_format=PLAIN, engine="batched", chunk_size=4)
    uninterrupted = audit_dataset(rows, tiny_model, tokenizer, **settings, resume_file=resume)
    lines = resume.read_text().splitlines()
    assert len(lines) == 1 + len(rows)
    resume.write_text("\n".join(lines[:1 + 6]) + "\n")  # chunk 0 complete, chunk 1 holds 2 of its 4 rows
    resumed = audit_dataset(rows, tiny_model, tokenizer, **settings, resume_file=resume)
    assert resumed.scored_now == len(rows) - 4  # chunk 1 in full and every later chunk
    for a, b in zip(resumed.records, uninterrupted.records):
        assert a == b  # exact: the same rows in the same forward passes
    keys = [json.loads(line)["key"] for line in resume.read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys)) == len(rows)  # the re-scored rows replace the cached ones, no duplicates


# ----------------------------------------------------------------------------------------------------------------
# Rules and options
# ----------------------------------------------------------------------------------------------------------------


def test_rule_validation():
    assert resolve_rule("paper") == AuditRule("nll_without_mean", 0.25, None, "paper")
    assert resolve_rule("default", quantile=0.1).quantile == 0.1
    with pytest.raises(ConfigurationError, match="rule must be one of"):
        resolve_rule("papr")
    with pytest.raises(ConfigurationError, match="statistic must be one of"):
        resolve_rule("default", statistic="ppl")
    with pytest.raises(ConfigurationError, match="between 0 and 1"):
        resolve_rule("default", quantile=1.5)
    with pytest.raises(ConfigurationError, match="not both"):
        resolve_rule("default", quantile=0.2, threshold=3.0)


def test_bad_options_fail_before_scoring(tiny_model, tokenizer):
    rows, _ = qa_rows()
    with pytest.raises(ConfigurationError, match="max_target_tokens"):
        audit_dataset(rows, tiny_model, tokenizer, max_target_tokens=0)
    with pytest.raises(ConfigurationError, match="engine must be one of"):
        audit_dataset(rows, tiny_model, tokenizer, engine="fast")
    with pytest.raises(ConfigurationError, match="probe_dtype"):
        audit_dataset(rows, tiny_model, tokenizer, probe_dtype="int8")


def test_histogram_png(knowing_model, tokenizer, tmp_path):
    rows, _ = qa_rows()
    result = audit_dataset(rows, knowing_model, tokenizer, data_format="qa", prompt_format=PLAIN)
    path = result.plot_histogram(tmp_path / "hist.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    result.to_jsonl(tmp_path / "audit.jsonl")
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["category"] for r in records] == result.categories
    assert all(math.isfinite(r["nll_without_context"]) for r in records)
