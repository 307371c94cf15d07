"""Formatting, encoding and the scoring engines on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ctx_callback import ProbeLengthError, ProbeScorer, PromptFormat, probes_from_records
from ctx_callback.scoring import normalize_answer
from tests.helpers import capital_records, make_tiny_llama


def _mixed_probes():
    """Capitals plus probes with longer contexts and multi-token answers: prompts of different lengths."""
    rows = capital_records()
    rows.append({"id": "long/1", "family": "long",
                 "context": "A long passage. " * 6 + "The author of Hamlet is Charles Dickens, says the book.",
                 "question": "Who wrote Hamlet?", "counterfactual_answer": "Charles Dickens",
                 "parametric_answer": "William Shakespeare"})
    rows.append({"id": "long/2", "family": "long", "context": "Gold has the chemical symbol Ag.",
                 "question": "What is the chemical symbol for gold?", "counterfactual_answer": "Ag",
                 "parametric_answer": "Au", "aligned_context": "Gold has the chemical symbol Au."})
    return probes_from_records(rows)


# -- formatting ---------------------------------------------------------------------------------------------------


def test_chat_prompt_and_continuation(tokenizer):
    fmt = PromptFormat.chat(tokenizer, system_prompt="Be brief.")
    prompt = fmt.prompt("The capital of France is Lyon.", "What is the capital of France?")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "Be brief." in prompt and "The capital of France is Lyon.\n\nWhat is the capital of France?" in prompt
    # the end-of-turn token is not part of the scored continuation
    assert fmt.continuation("x", "y", "Lyon", prompt=fmt.prompt("x", "y")) == "Lyon"
    closed = fmt.prompt(None, "What is the capital of France?")
    assert "Lyon" not in closed and "What is the capital of France?" in closed


def test_template_presets_and_callable(tokenizer):
    alpaca = PromptFormat.from_template("alpaca")
    assert "### Input:\nctx" in alpaca.prompt("ctx", "q") and "### Input" not in alpaca.prompt(None, "q")
    plain = PromptFormat.from_template("plain")
    assert plain.continuation("c", "q", "Paris") == " Paris"
    fn = PromptFormat.from_callable(lambda c, q: f"[{c}] {q} =>")
    assert fn.prompt(None, "q") == "[None] q =>"
    with pytest.raises(ValueError, match=r"\{context\}"):
        PromptFormat.from_template("Question: {question}")
    with pytest.raises(ValueError, match="Unknown prompt_format"):
        ProbeScorer(probes_from_records(capital_records(1)), tokenizer, prompt_format="chatml")


def test_chat_format_requires_a_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has none"):
        ProbeScorer(probes_from_records(capital_records(1)), tok, prompt_format="chat")


# -- encoding -------------------------------------------------------------------------------------------------------


def test_variants_and_shared_prefix(tokenizer, capital_probes):
    scorer = ProbeScorer(capital_probes, tokenizer)
    enc = scorer.encoded
    assert len(enc.items) == 3 * len(capital_probes)
    assert len(enc.shared_prefix) > 10  # SmolLM2's system preamble is shared by every prompt
    item = enc.items[0]
    assert tokenizer.decode(item.counterfactual_ids) == "Lyon"
    assert tokenizer.decode(item.parametric_ids) == "Paris"


def test_probes_that_do_not_fit_fail_before_training(tokenizer, capital_probes):
    with pytest.raises(ProbeLengthError, match=r"maximum length of 20 tokens: 'capitals/france'"):
        ProbeScorer(capital_probes, tokenizer, max_length=20)


def test_token_merge_at_the_prompt_answer_boundary(tokenizer, tiny_model):
    """'A: ' + 'Lyon' tokenizes as 'A', ':', ' Lyon': as in SFTTrainer's prompt-completion split, the merged token
    belongs to the answer and the prompt ends where the prompt and the joint tokenization agree."""
    fmt = PromptFormat.from_template("{context}\nQ: {question}\nA: ", closed_book_template="Q: {question}\nA: ")
    probes = probes_from_records(capital_records(3))
    simple = ProbeScorer(probes, tokenizer, fmt, engine="simple")
    item = simple.encoded.items[0]
    prompt_alone = tokenizer(item.prompt_text, add_special_tokens=False)["input_ids"]
    joint = tokenizer(item.prompt_text + "Lyon", add_special_tokens=False)["input_ids"]
    assert joint[: len(prompt_alone)] != prompt_alone  # a real merge
    assert list(item.prompt_ids) == prompt_alone[:-1] == joint[: len(item.prompt_ids)]
    assert list(item.prompt_ids) + list(item.counterfactual_ids) == joint
    assert tokenizer.decode(item.counterfactual_ids) == " Lyon"
    for engine in ("batched", "prefix"):
        fast = ProbeScorer(probes, tokenizer, fmt, engine=engine)
        np.testing.assert_allclose(fast.score_raw(tiny_model).scores, simple.score_raw(tiny_model).scores, atol=1e-5)


def test_scoring_again_does_no_tokenizer_work(tokenizer, tiny_model, capital_probes, monkeypatch):
    scorer = ProbeScorer(capital_probes, tokenizer)
    calls = {"n": 0}
    cls = type(tokenizer)
    original_call, original_chat = cls.__call__, cls.apply_chat_template

    def counting_call(self, *a, **k):
        calls["n"] += 1
        return original_call(self, *a, **k)

    def counting_chat(self, *a, **k):
        calls["n"] += 1
        return original_chat(self, *a, **k)

    monkeypatch.setattr(cls, "__call__", counting_call)
    monkeypatch.setattr(cls, "apply_chat_template", counting_chat)
    tokenizer("sanity")
    assert calls["n"] == 1  # the counter works
    scorer.score(tiny_model)
    scorer.score(tiny_model)
    assert calls["n"] == 1


# -- engines agree with the unbatched reference ---------------------------------------------------------------------


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
@pytest.mark.parametrize("engine", ["batched", "prefix"])
def test_batched_engines_equal_unbatched_reference(tokenizer, engine, prompt_format):
    model = make_tiny_llama(tokenizer, seed=1)
    probes = _mixed_probes()
    ref = ProbeScorer(probes, tokenizer, prompt_format, engine="simple").score_raw(model)
    # small batches force several length buckets and padding inside each
    fast = ProbeScorer(probes, tokenizer, prompt_format, engine=engine, max_batch_tokens=300).score_raw(model)
    assert np.isfinite(ref.scores).all()
    np.testing.assert_allclose(fast.scores, ref.scores, atol=1e-5, rtol=0)


def test_no_pad_token_and_left_padding_side(tokenizer):
    model = make_tiny_llama(tokenizer, seed=2)
    probes = _mixed_probes()
    ref = ProbeScorer(probes, tokenizer, engine="simple").score_raw(model).scores
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    tok.padding_side = "left"
    for engine in ("batched", "prefix"):
        got = ProbeScorer(probes, tok, engine=engine, max_batch_tokens=300).score_raw(model).scores
        np.testing.assert_allclose(got, ref, atol=1e-5)
    assert tok.padding_side == "left"  # never changed


def test_shards_merge_to_the_full_result(tokenizer, tiny_model, capital_probes):
    from ctx_callback import ScoreResult

    scorer = ProbeScorer(capital_probes, tokenizer)
    full = scorer.score_raw(tiny_model)
    shards = [scorer.score_raw(tiny_model, range(r, len(capital_probes), 3)) for r in (2, 0, 1)]
    merged = ScoreResult.merge(shards)
    np.testing.assert_array_equal(merged.probe_indices, np.arange(len(capital_probes)))
    np.testing.assert_allclose(merged.scores, full.scores, atol=1e-6)
    # Shards run other batch shapes: scores agree to float rounding (atol 1e-6 above), so do the metrics, which are
    # means and differences of them; absolute tolerance too, since some (context_lift) can be near zero.
    assert scorer.metrics(merged) == pytest.approx(scorer.metrics(full), rel=1e-6, abs=1e-5)


def test_scoring_restores_modes_and_rng(tokenizer, tiny_model, capital_probes):
    tiny_model.train()
    tiny_model.model.layers[0].eval()  # a mixed state must survive as it was
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ProbeScorer(capital_probes, tokenizer).score(tiny_model)
    assert torch.equal(torch.rand(3), expected)
    assert tiny_model.training and not tiny_model.model.layers[0].training
    assert torch.is_grad_enabled()


# -- generation mode ------------------------------------------------------------------------------------------------


def test_generation_mode_on_a_model_that_always_says_lyon(tokenizer):
    """An lm_head whose bias always picks ' Lyon': every output is predictable."""
    model = make_tiny_llama(tokenizer, seed=3)
    lyon = tokenizer(" Lyon", add_special_tokens=False)["input_ids"]
    assert len(lyon) == 1
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[lyon[0]] = 10.0
    model.lm_head = head
    model.config.tie_word_embeddings = False
    rows = capital_records(2)  # France: cf Lyon / par Paris ; Japan: cf Osaka / par Tokyo
    rows.append({"id": "x/rev", "family": "x", "context": "The capital of France is Paris.",
                 "question": "Which French city hosts a famous silk museum?", "counterfactual_answer": "Paris",
                 "parametric_answer": "Lyon"})
    scorer = ProbeScorer(probes_from_records(rows), tokenizer, mode="generate", max_new_tokens=3)
    report = scorer.score(model)
    gens = [r["context_generation"] for r in report.records]
    assert gens == ["Lyon Lyon Lyon"] * 3
    m = report.metrics
    assert m["ctx_reliance/counterfactual_accuracy"] == pytest.approx(1 / 3)
    assert m["ctx_reliance/parametric_accuracy"] == pytest.approx(1 / 3)
    assert m["ctx_reliance/neither_rate"] == pytest.approx(1 / 3)
    assert m["ctx_reliance/both_rate"] == 0.0
    assert m["ctx_reliance/memorization_ratio"] == pytest.approx(0.5)


def test_normalize_answer():
    assert normalize_answer("  The Brasília!  ") == "brasilia"
    assert normalize_answer("Washington, D.C.") == "washington d c"
