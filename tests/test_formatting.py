"""formatting.PromptFormat and resolve_prompt_format, directly (the real SmolLM2 tokenizer for chat formats)."""

from __future__ import annotations

import copy

import pytest

from ctx_callback.errors import ConfigurationError, ConfigurationTypeError
from ctx_callback.formatting import PROMPT_PRESETS, PromptFormat, resolve_prompt_format

CTX, Q = "The capital of France is Lyon.", "What is the capital of France?"


def test_chat_prompt_is_the_generation_prompt_of_the_template(tokenizer):
    fmt = PromptFormat.chat(tokenizer)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": f"{CTX}\n\n{Q}"}], tokenize=False,
                                             add_generation_prompt=True)
    assert fmt.prompt(CTX, Q) == expected
    assert not fmt.adds_special_tokens  # the template writes its own special tokens


def test_chat_continuation_is_the_answer_without_end_of_turn(tokenizer):
    fmt = PromptFormat.chat(tokenizer, system_prompt="Answer in one word.")
    prompt = fmt.prompt(CTX, Q)
    assert "Answer in one word." in prompt
    continuation = fmt.continuation(CTX, Q, "Lyon", prompt=prompt)
    assert continuation == "Lyon"
    full = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": f"{CTX}\n\n{Q}"},
         {"role": "assistant", "content": "Lyon"}], tokenize=False)
    assert full.startswith(prompt + continuation) and full != prompt + continuation  # <|im_end|> follows


def test_chat_template_kwargs_reach_the_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% if brief %}[brief]{% endif %}{% endif %}")
    plain = PromptFormat.chat(tok).prompt(CTX, Q)
    brief = PromptFormat.chat(tok, chat_template_kwargs={"brief": True}).prompt(CTX, Q)
    assert brief == plain + "[brief]"


def test_closed_book_drops_the_context(tokenizer):
    for fmt in (PromptFormat.chat(tokenizer), PromptFormat.from_template("alpaca"), PromptFormat.from_template("tulu")):
        closed = fmt.prompt(None, Q)
        assert Q in closed and "Lyon" not in closed


@pytest.mark.parametrize("name", sorted(PROMPT_PRESETS))
def test_presets_render_context_question_and_answer_prefix(name):
    fmt = PromptFormat.from_template(name)
    template, closed_template, prefix = PROMPT_PRESETS[name]
    assert fmt.prompt(CTX, Q) == template.format(context=CTX, question=Q)
    assert fmt.prompt(None, Q) == closed_template.format(question=Q)
    assert fmt.continuation(CTX, Q, "Lyon") == prefix + "Lyon"
    assert fmt.adds_special_tokens


def test_template_without_closed_book_template_keeps_an_empty_context():
    fmt = PromptFormat.from_template("C: {context} | Q: {question} | A:", answer_prefix=" ")
    assert fmt.prompt(None, "q?") == "C:  | Q: q? | A:"
    assert fmt.continuation("c", "q?", "x") == " x"


def test_callable_format():
    fmt = resolve_prompt_format(lambda c, q: f"{c or '-'} / {q} =", None)
    assert fmt.kind == "callable" and fmt.prompt(None, "q") == "- / q ="
    broken = PromptFormat.from_callable(lambda c, q: 42)
    with pytest.raises(ConfigurationTypeError, match="must return a string, got int"):
        broken.prompt("c", "q")


@pytest.mark.parametrize("bad, error, match", [
    ("Question: {question}", ConfigurationError, r"must contain the placeholder \{context\}"),
    ("{context} {question} {answer}", ConfigurationError, "not a valid format string"),
    ("chatml", ConfigurationError, "Unknown prompt_format 'chatml'"),
    (42, ConfigurationTypeError, "got int"),
])
def test_bad_prompt_formats(bad, error, match):
    with pytest.raises(error, match=match):
        resolve_prompt_format(bad, None)


def test_chat_needs_a_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ConfigurationError, match="has none"):
        resolve_prompt_format("chat", tok)


def test_a_template_that_rewrites_the_answer_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ConfigurationError, match="dropped or rewrote the answer 'Lyon'"):
        PromptFormat.chat(tok).continuation(CTX, Q, "Lyon")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant (thinking off): {% endif %}")
    with pytest.raises(ConfigurationError, match="differently from the generation prompt"):
        PromptFormat.chat(tok).continuation(CTX, Q, "Lyon")


def test_a_given_prompt_format_gets_the_tokenizer(tokenizer):
    fmt = PromptFormat.from_template("plain")
    assert resolve_prompt_format(fmt, tokenizer) is fmt and fmt.tokenizer is tokenizer
