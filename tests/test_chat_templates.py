"""Chat probes on the chat templates people fine-tune with, token for token against TRL's ``SFTTrainer``.

Each case is a chat template written here (not a copy of a real template file) that reproduces the structural
features of one family, installed on a copy of the real SmolLM2 tokenizer (with the family's control tokens added
as single tokens where the family has them):

- ``llama3``: a BOS the template writes (``{{ bos_token }}``, while the tokenizer would also add one), a system
  header carrying dates (``Cutting Knowledge Date`` / ``Today Date``, the date passed as ``date_string``), and
  ``<|end_header_id|>\\n\\n`` before every turn, ``<|eot_id|>`` after it.
- ``qwen2.5``: ChatML with a default system prompt injected when the conversation has none.
- ``qwen3-no-think``: ChatML; ``enable_thinking=False`` (``chat_template_kwargs``) puts an empty think block
  ``<think>\\n\\n</think>\\n\\n`` into the generation prompt, and the rendered last assistant turn has the same
  block; ``qwen3-think`` is the same template without the argument: the empty block is then part of the answer.
- ``gemma``: no system role (``raise_exception`` on a system message), ``<start_of_turn>user``/``model`` turns.
- ``mistral``: ``<s>[INST] ... [/INST] answer</s>``; a system message is folded into the first user turn by the
  template itself.
- ``bos-by-tokenizer``: a template without BOS on a tokenizer that adds a BOS to plain text
  (``add_bos_token=True``). ``apply_chat_template(tokenize=True)`` tokenizes the rendered text with
  ``add_special_tokens=False``, so TRL trains *without* that BOS, and so must the probes.

For every case: (a) the probe's prompt ids are TRL's prompt part of the tokenized prompt-completion example (the
tokens before ``completion_mask`` turns on) and the answer ids are TRL's completion up to the end-of-turn tokens
(which are not scored, see :mod:`ctx_callback.formatting`), for the context and the closed-book variants, with and
without a system prompt; (b) the shared-preamble prefix engine scores like the simple engine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from ctx_callback import ProbeScorer, probes_from_records
from ctx_callback.errors import ConfigurationError
from ctx_callback.formatting import PromptFormat
from tests.helpers import LOGLIK_ATOL, capital_records, make_tiny_llama, sft_config

SYSTEM = "Answer with one word."
DATE = {"date_string": "01 Jan 2000"}  # not today: TRL must be given it too

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant built for tests.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN3 = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

MISTRAL = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

ZEPHYR_NO_BOS = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Case:
    """A chat template on a tokenizer, and how to call it (what training passes as ``chat_template_kwargs``)."""

    name: str
    template: str
    special_tokens: dict[str, Any] = field(default_factory=dict)
    added_tokens: tuple[str, ...] = ()
    add_bos_token: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: The text that may follow the answer in the completion (end of turn), besides whitespace.
    end_of_turn: tuple[str, ...] = ()
    system_role: bool = True
    #: Where the BOS comes from: the template writes it (``True``), or nothing does (``False``).
    template_bos: bool = False


CASES = [
    Case("llama3", LLAMA3,
         {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
          "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]},
         add_bos_token=True, kwargs=DATE, end_of_turn=("<|eot_id|>",), template_bos=True),
    Case("qwen2.5", QWEN25, end_of_turn=("<|im_end|>",)),
    Case("qwen3-no-think", QWEN3, added_tokens=("<think>", "</think>"), kwargs={"enable_thinking": False},
         end_of_turn=("<|im_end|>",)),
    Case("qwen3-think", QWEN3, added_tokens=("<think>", "</think>"), end_of_turn=("<|im_end|>",)),
    Case("gemma", GEMMA,
         {"bos_token": "<bos>", "eos_token": "<eos>",
          "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
         end_of_turn=("<end_of_turn>",), system_role=False, template_bos=True),
    Case("mistral", MISTRAL,
         {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["[INST]", "[/INST]"]},
         end_of_turn=("</s>",), template_bos=True),
    Case("bos-by-tokenizer", ZEPHYR_NO_BOS,
         {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["<|user|>", "<|assistant|>",
                                                                                 "<|system|>"]},
         add_bos_token=True, end_of_turn=("</s>",)),
]
IDS = [case.name for case in CASES]


def make_tokenizer(base, case: Case):
    tok = copy.deepcopy(base)
    if case.special_tokens:
        tok.add_special_tokens(case.special_tokens)
    if case.added_tokens:
        tok.add_tokens(list(case.added_tokens))
    if case.add_bos_token:
        tok.add_bos_token = True
    tok.chat_template = case.template
    return tok


#: An answer that also occurs in what a template writes before it ("in" in "<think>"), and one that does not.
TRICKY = {"id": "words/think", "family": "words", "context": "The word is think.", "question": "What is the word?",
          "counterfactual_answer": "think", "parametric_answer": "in"}


@pytest.fixture(scope="module")
def probes():
    return probes_from_records(capital_records(3) + [TRICKY])


def user_turn(context: str | None, question: str) -> str:
    """The user turn as :class:`~ctx_callback.formatting.PromptFormat` builds it by default (and training must)."""
    return question if context is None else f"{context}\n\n{question}"


VARIANT_CONTEXT = {"context": lambda p: p.context, "closed_book": lambda p: None, "aligned": lambda p: p.aligned()}


def trl_tokenized(tok, probes, case: Case, system: str | None, tmp_path, user=user_turn):
    """Run TRL's own dataset preparation on conversational prompt-completion rows, one per (probe, variant, answer).

    Returns ``{(probe_index, variant, answer): (prompt_ids, completion_ids)}``, split where TRL's loss starts (its
    ``completion_mask``, which TRL turns into the ``-100`` labels of the prompt tokens).
    """
    import datasets
    from trl import SFTTrainer

    keys, rows = [], []
    for index, probe in enumerate(probes):
        for variant, context_of in VARIANT_CONTEXT.items():
            prompt = [{"role": "user", "content": user(context_of(probe), probe.question)}]
            if system is not None:
                prompt.insert(0, {"role": "system", "content": system})
            for answer in (probe.counterfactual_answer, probe.parametric_answer):
                row: dict[str, Any] = {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}
                if case.kwargs:
                    row["chat_template_kwargs"] = dict(case.kwargs)  # TRL 1.16 reads it per example only
                rows.append(row)
                keys.append((index, variant, answer))
    trainer = SFTTrainer(
        model=make_tiny_llama(tok), args=sft_config(tmp_path, max_length=None),
        train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
    )
    data = trainer.train_dataset
    out = {}
    for i, key in enumerate(keys):
        input_ids, labels = list(data[i]["input_ids"]), list(data[i]["labels"])
        start = next(n for n, label in enumerate(labels) if label != -100)
        assert labels[:start] == [-100] * start and labels[start:] == input_ids[start:]
        out[key] = (input_ids[:start], input_ids[start:])
    return out


def systems_for(case: Case):
    return [None, SYSTEM] if case.system_role else [None]


def assert_trl_tokens(tok, probes, case: Case, system: str | None, tmp_path, user=user_turn, **chat_options):
    """Every encoded (probe, variant, answer) is TRL's prompt, then TRL's completion up to the end of the turn."""
    trl = trl_tokenized(tok, probes, case, system, tmp_path, user=user)
    fmt = PromptFormat.chat(tok, system_prompt=system, chat_template_kwargs=case.kwargs, **chat_options)
    scorer = ProbeScorer(probes, tok, prompt_format=fmt)
    if "date_string" in case.kwargs:
        assert "Today Date: " + case.kwargs["date_string"] in scorer.encoded.items[0].prompt_text
    seen = set()
    for item in scorer.encoded.items:
        probe = probes[item.probe_index]
        for answer, answer_ids in ((probe.counterfactual_answer, item.counterfactual_ids),
                                   (probe.parametric_answer, item.parametric_ids)):
            prompt_ids, completion = trl[(item.probe_index, item.variant, answer)]
            where = f"{case.name} system={system!r} {item.variant} {answer!r}"
            assert list(item.prompt_ids) == prompt_ids, where
            assert completion[: len(answer_ids)] == list(answer_ids), where
            tail = tok.decode(completion[len(answer_ids):])  # not scored: the end of the turn
            for marker in case.end_of_turn:
                tail = tail.replace(marker, "")
            assert tail.strip() == "", f"{where}: the completion goes on with {tail!r} after the answer"
            seen.add(item.variant)
    assert seen == {"context", "closed_book", "aligned"}
    if "bos_token" in case.special_tokens:  # one BOS where the template writes one, none otherwise ...
        first = scorer.encoded.items[0].prompt_ids
        assert first.count(tok.bos_token_id) == int(case.template_bos)
        assert (first[0] == tok.bos_token_id) == case.template_bos
    if case.add_bos_token:  # ... although this tokenizer adds a BOS to plain text
        assert tok("x")["input_ids"][0] == tok.bos_token_id


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_probe_tokens_are_trl_training_tokens(case, tokenizer, probes, tmp_path):
    tok = make_tokenizer(tokenizer, case)
    for system in systems_for(case):
        assert_trl_tokens(tok, probes, case, system, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prefix_engine_matches_simple_engine(case, tokenizer, probes):
    tok = make_tokenizer(tokenizer, case)
    model = make_tiny_llama(tok)
    system = SYSTEM if case.system_role else None
    scores = {}
    for engine in ("prefix", "simple"):
        scorer = ProbeScorer(probes, tok, prompt_format="chat", engine=engine, system_prompt=system,
                             chat_template_kwargs=case.kwargs or None)
        scores[engine] = scorer.score_raw(model).scores
        assert len(scorer.encoded.shared_prefix) >= 2  # the preamble the prefix engine computes once
    assert np.isfinite(scores["simple"]).all()
    # A cached preamble and batched tails against one unbatched pass per answer: equal up to float32 summation order
    # (measured up to 6.7e-6, on AVX-512 and AVX2); see LOGLIK_ATOL.
    np.testing.assert_allclose(scores["prefix"], scores["simple"], atol=LOGLIK_ATOL, rtol=0)


def test_a_template_without_system_role_refuses_a_system_prompt_clearly(tokenizer, probes, tmp_path):
    case = next(c for c in CASES if c.name == "gemma")
    tok = make_tokenizer(tokenizer, case)
    with pytest.raises(ConfigurationError, match="system_prompt='Answer with one word.'.*System role not supported"):
        ProbeScorer(probes, tok, prompt_format="chat", system_prompt=SYSTEM)
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="System role not supported"):  # TRL cannot train on it either
        trl_tokenized(tok, probes, case, SYSTEM, tmp_path)


def test_instructions_folded_into_the_user_turn_on_a_template_without_system_role(tokenizer, probes, tmp_path):
    """The way out the refusal names: the same instructions in the user turn, in the probes and the training data."""
    case = next(c for c in CASES if c.name == "gemma")
    tok = make_tokenizer(tokenizer, case)

    def folded(context, question):
        return f"{SYSTEM}\n\n{user_turn(context, question)}"

    assert_trl_tokens(tok, probes, case, None, tmp_path, user=folded,
                      user_template=SYSTEM + "\n\n{context}\n\n{question}",
                      closed_book_user_template=SYSTEM + "\n\n{question}")


def test_the_chat_prompt_gives_its_unstable_end_to_the_answer(tokenizer):
    """``\\n\\n`` alone is one token, before an answer two: the prompt stops before it, the answer starts with it."""
    tok = make_tokenizer(tokenizer, next(c for c in CASES if c.name == "qwen3-no-think"))
    fmt = PromptFormat.chat(tok, chat_template_kwargs={"enable_thinking": False})
    prompt = fmt.prompt(None, "Q?")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>")
    assert fmt.continuation(None, "Q?", "in", prompt=prompt) == "\n\nin"
    thinking = PromptFormat.chat(tok)  # thinking on: the empty think block is written into the answer turn
    prompt = thinking.prompt(None, "Q?")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert thinking.continuation(None, "Q?", "in", prompt=prompt) == "<think>\n\n</think>\n\nin"
