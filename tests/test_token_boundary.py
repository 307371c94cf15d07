"""The prompt/answer token split equals TRL's for text prompts that merge with the answer across the boundary."""

from __future__ import annotations

import datasets
import pytest

from ctx_callback import ProbeScorer, probes_from_records
from tests.helpers import LOGLIK_ATOL, capital_records, make_tiny_llama, sft_config


def trl_split(tok, rows, tmp_path):
    """TRL's own prompt/completion split of non-conversational prompt-completion rows (where its labels start)."""
    from trl import SFTTrainer

    trainer = SFTTrainer(model=make_tiny_llama(tok), args=sft_config(tmp_path, max_length=None),
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    out = []
    for example in trainer.train_dataset:
        ids, labels = list(example["input_ids"]), list(example["labels"])
        start = next(n for n, label in enumerate(labels) if label != -100)
        out.append((ids[:start], ids[start:]))
    return out


@pytest.mark.parametrize("template", [
    "Context: {context}\nQuestion: {question}\nAnswer: ",   # trailing space: merges with the answer
    "Context: {context}\nQuestion: {question}\nAnswer:",    # no merge (the preset style)
])
def test_text_prompt_split_equals_trl(tokenizer, tmp_path, template):
    probes = probes_from_records(capital_records(3))
    scorer = ProbeScorer(probes, tokenizer, prompt_format=template, variants=("context",))
    rows, ours = [], []
    for item in scorer.encoded.items:
        probe = probes[item.probe_index]
        prompt = template.format(context=probe.context, question=probe.question)
        for answer, answer_ids in ((probe.counterfactual_answer, item.counterfactual_ids),
                                   (probe.parametric_answer, item.parametric_ids)):
            rows.append({"prompt": prompt, "completion": answer})
            ours.append((list(item.prompt_ids), list(answer_ids)))
    merged = template.endswith(" ")
    for (prompt_ids, answer_ids), (trl_prompt, trl_completion) in zip(ours, trl_split(tokenizer, rows, tmp_path)):
        assert prompt_ids == trl_prompt
        assert trl_completion[: len(answer_ids)] == answer_ids
        assert tokenizer.decode(trl_completion[len(answer_ids):]).strip() in ("", tokenizer.eos_token)
        assert tokenizer.decode(answer_ids).startswith(" ") == merged  # " Paris" is one token when merged


def test_engines_agree_on_a_merging_template(tokenizer):
    probes = probes_from_records(capital_records())
    model = make_tiny_llama(tokenizer)
    template = "Q: {context} {question}\nA: "
    ref = ProbeScorer(probes, tokenizer, prompt_format=template, engine="simple").score_raw(model).scores
    for engine in ("batched", "prefix"):
        got = ProbeScorer(probes, tokenizer, prompt_format=template, engine=engine).score_raw(model).scores
        assert got == pytest.approx(ref, abs=LOGLIK_ATOL, nan_ok=True)  # other batch shapes: see LOGLIK_ATOL
