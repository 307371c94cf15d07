"""Prompt formats: render a probe exactly as the model sees its training data.

Three kinds, all exposing the same two methods (:meth:`PromptFormat.prompt` and :meth:`PromptFormat.continuation`):

- ``"chat"``: the tokenizer's chat template, ``add_generation_prompt=True``, optional system prompt and
  ``chat_template_kwargs`` (pass the same ones as training). The answer continuation is the text the template puts
  after the generation prompt, up to the end of the answer: the end-of-turn token is *not* scored, so a model
  that would go on after the answer ("Lyon, a city in ...") is not penalised for it.
- a template string with ``{context}`` and ``{question}`` placeholders, or a preset name (``"alpaca"``, ``"tulu"``,
  ``"plain"``); the answer is appended after ``answer_prefix``.
- a user callable ``fn(context_or_None, question) -> prompt_text``.

Chat probes are the tokens ``SFTTrainer`` trains on. TRL tokenizes a conversational prompt-completion example as
``apply_chat_template(prompt, add_generation_prompt=True)`` and ``apply_chat_template(prompt + completion)`` (both
rendered, then tokenized with ``add_special_tokens=False``) and starts the completion where the two token lists
diverge. So:

- The prompt is the generation prompt, cut back to the last token boundary that an answer cannot merge across. A
  generation prompt that ends in text the tokenizer joins with what follows (``<|end_header_id|>\\n\\n`` or
  ``</think>\\n\\n`` with a GPT-2-style pre-tokenizer, where ``"\\n\\n"`` alone is one token but ``"\\n\\nLyon"`` is
  ``"\\n" "\\n" "L" "yon"``) is trained as the joint tokens: those trailing characters then belong to the answer,
  exactly where TRL's completion starts, instead of being scored as a token the model never sees before an answer.
- The continuation is what the template writes between the generation prompt and the end of the answer (a leading
  space, an empty think block when the template adds one to the answer turn), found by rendering a marker answer.
- No BOS is added on top of the rendered text: a template that writes ``{{ bos_token }}`` gets one BOS, a template
  that writes none gets none, even when the tokenizer adds a BOS to plain text (``add_bos_token``), as in TRL.
- A template that renders the generation prompt differently from the answered conversation (the text of the prompt
  is not a prefix) is refused; TRL trains such data with the prompt's divergent end left out, and warns.

Template features checked token for token against ``SFTTrainer`` (``tests/test_chat_templates.py``, on templates
written to reproduce each family): a BOS written by the template while the tokenizer also adds one, and a system
header with dates (Llama 3.x; pin the date with ``chat_template_kwargs={"date_string": ...}`` for training and probes,
or a run that crosses midnight renders another date); ChatML with a default system prompt injected when none is
given (Qwen2.5); ``enable_thinking=False`` putting an empty think block in the generation prompt and the answer turn
(Qwen3), and the same template with thinking on, where the empty block is part of the scored answer; no system role
(Gemma: without ``system_prompt`` it works, with one it is a :class:`~ctx_callback.errors.ConfigurationError` naming
``system_prompt``; fold instructions into ``user_template`` instead, and into the training data likewise);
``[INST]`` turns with a system message folded into the first user turn by the template (Mistral); and a template
without BOS on a tokenizer that adds one to plain text. TRL 1.16 reads ``chat_template_kwargs`` from a
``chat_template_kwargs`` column of the dataset (``SFTConfig`` has no such option); pass the same ones here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError, ConfigurationTypeError

__all__ = ["PROMPT_PRESETS", "PromptFormat", "common_prefix_length", "resolve_prompt_format"]

#: Preset templates: (template with context, closed-book template, answer prefix).
PROMPT_PRESETS: dict[str, tuple[str, str, str]] = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{question}\n\n### Input:\n{context}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{question}\n\n### Response:\n",
        "",
    ),
    "tulu": (
        "<|user|>\n{context}\n\n{question}\n<|assistant|>\n",
        "<|user|>\n{question}\n<|assistant|>\n",
        "",
    ),
    "plain": (
        "Context: {context}\nQuestion: {question}\nAnswer:",
        "Question: {question}\nAnswer:",
        " ",
    ),
}

#: Starts of typical answers: a chat prompt is cut back to a token boundary that none of them merges across.
ANSWER_STARTS: tuple[str, ...] = ("A", "a", "0", " A")
#: Marker answer rendered to find what a chat template writes before the answer (it is rendered, never scored).
_ANSWER_MARKER = "\ue000ctx_callback answer\ue001"
#: The most characters a chat prompt is cut back by (the end of one merged token, in practice a few).
_MAX_CUT = 64
#: Characters at the end of a chat prompt that decide its last token boundary (merges across it are local); the
#: boundary is worked out once per distinct last ``_KEY`` characters (a template's generation header, usually).
_WINDOW = 256
_KEY = 32

#: How the user turn of a chat prompt is built from a probe (``closed_book`` drops the context).
DEFAULT_USER_TEMPLATE = "{context}\n\n{question}"
DEFAULT_CLOSED_BOOK_TEMPLATE = "{question}"


def _template_errors() -> tuple[type[Exception], ...]:
    """The exception types a chat template raises when it refuses a conversation (jinja2's ``TemplateError``)."""
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # pragma: no cover - transformers needs jinja2 to apply any chat template
        return ()
    return (TemplateError,)


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """How many leading tokens two id sequences share (TRL's ``common_prefix_length``)."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def _check_placeholders(template: str, name: str, needed: tuple[str, ...]) -> None:
    for key in needed:
        if "{" + key + "}" not in template:
            raise ConfigurationError(f"{name} {template!r} must contain the placeholder {{{key}}}.")
    try:
        template.format(context="", question="")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigurationError(
            f"{name} {template!r} is not a valid format string with only {{context}} and {{question}} "
            f"placeholders ({type(err).__name__}: {err}); write literal braces as '{{{{' and '}}}}'."
        ) from None


@dataclass
class PromptFormat:
    """How a probe is turned into prompt text and how an answer continues it.

    Build one with :meth:`chat`, :meth:`template` or :meth:`from_callable` (or let :func:`resolve_prompt_format`
    pick from a string). Instances are plain data: the same probes + format + tokenizer give the same tokens.

    Attributes:
        kind: ``"chat"``, ``"template"`` or ``"callable"``.
        tokenizer: The tokenizer (chat formats use its chat template).
        system_prompt: Optional system message (chat only).
        chat_template_kwargs: Extra keyword arguments for ``apply_chat_template`` (e.g. ``enable_thinking``).
        user_template: Chat user turn with a context (placeholders ``{context}``, ``{question}``).
        closed_book_user_template: Chat user turn without a context.
        template: Prompt template with a context (template kind).
        closed_book_template: Prompt template without a context (template kind).
        answer_prefix: Text placed between the prompt and the answer (template and callable kinds).
        fn: The user callable (callable kind).
    """

    kind: str
    tokenizer: Any = None
    system_prompt: str | None = None
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    user_template: str = DEFAULT_USER_TEMPLATE
    closed_book_user_template: str = DEFAULT_CLOSED_BOOK_TEMPLATE
    template: str | None = None
    closed_book_template: str | None = None
    answer_prefix: str = ""
    fn: Callable[[str | None, str], str] | None = None
    # Memos of the chat rendering (same inputs, same result): characters cut off a prompt, keyed by its last
    # characters; and what the template writes before the answer, for the last (prompt, context, question).
    _cuts: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _head: tuple[tuple[str, str | None, str], str | None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def chat(
        cls,
        tokenizer: Any,
        *,
        system_prompt: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        user_template: str = DEFAULT_USER_TEMPLATE,
        closed_book_user_template: str = DEFAULT_CLOSED_BOOK_TEMPLATE,
    ) -> PromptFormat:
        """The tokenizer's chat template (as ``SFTTrainer`` applies it to conversational data)."""
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigurationError(
                "prompt_format='chat' needs a tokenizer with a chat template, and this tokenizer has none. "
                "Set tokenizer.chat_template, or pass prompt_format='alpaca' / 'tulu' / 'plain' or a template "
                "string with {context} and {question} that matches your training data."
            )
        _check_placeholders(user_template, "user_template", ("context", "question"))
        _check_placeholders(closed_book_user_template, "closed_book_user_template", ("question",))
        return cls(
            kind="chat",
            tokenizer=tokenizer,
            system_prompt=system_prompt,
            chat_template_kwargs=dict(chat_template_kwargs or {}),
            user_template=user_template,
            closed_book_user_template=closed_book_user_template,
        )

    @classmethod
    def from_template(
        cls,
        template: str,
        *,
        closed_book_template: str | None = None,
        answer_prefix: str = "",
        tokenizer: Any = None,
    ) -> PromptFormat:
        """A template string, or a preset name from :data:`PROMPT_PRESETS`."""
        if template in PROMPT_PRESETS:
            template, preset_closed, preset_prefix = PROMPT_PRESETS[template]
            closed_book_template = closed_book_template or preset_closed
            answer_prefix = answer_prefix or preset_prefix
        _check_placeholders(template, "prompt template", ("context", "question"))
        if closed_book_template is not None:
            _check_placeholders(closed_book_template, "closed_book_template", ("question",))
        return cls(
            kind="template",
            tokenizer=tokenizer,
            template=template,
            closed_book_template=closed_book_template,
            answer_prefix=answer_prefix,
        )

    @classmethod
    def from_callable(
        cls, fn: Callable[[str | None, str], str], *, answer_prefix: str = "", tokenizer: Any = None
    ) -> PromptFormat:
        """A callable ``fn(context, question) -> prompt``; ``context`` is ``None`` for the closed-book control."""
        if not callable(fn):
            raise ConfigurationTypeError(f"prompt_format callable expected, got {type(fn).__name__}.")
        return cls(kind="callable", tokenizer=tokenizer, fn=fn, answer_prefix=answer_prefix)

    # -- rendering ----------------------------------------------------------------------------------------------
    def _messages(self, context: str | None, question: str) -> list[dict[str, str]]:
        if context is None:
            user = self.closed_book_user_template.format(question=question, context="")
        else:
            user = self.user_template.format(context=context, question=question)
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": user})
        return messages

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """Apply the tokenizer's chat template; a template that refuses the conversation is a configuration error.

        A template can refuse a conversation with ``raise_exception(...)`` (Gemma's refuses a system message, others
        insist on alternating roles). That surfaces as a ``jinja2`` ``TemplateError``; it is raised again as a
        :class:`~ctx_callback.errors.ConfigurationError` that quotes the template's own message and says what to do.
        """
        extra = {"add_generation_prompt": True} if add_generation_prompt else {}  # continuation: the default
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **extra, **self.chat_template_kwargs)
        except _template_errors() as err:
            if self.system_prompt is not None:
                raise ConfigurationError(
                    f"The tokenizer's chat template refuses the probe conversation with system_prompt="
                    f"{self.system_prompt!r}: {err}. Many templates (Gemma's, for one) have no system role. Drop it "
                    "(system_prompt=None), or fold it into the user turn yourself, as your training data must then "
                    "do too: prompt_format=PromptFormat.chat(tokenizer, user_template='<instructions>\\n\\n{context}"
                    "\\n\\n{question}', closed_book_user_template='<instructions>\\n\\n{question}')."
                ) from err
            raise ConfigurationError(
                f"The tokenizer's chat template failed to render a probe conversation (a user turn"
                f"{', with a generation prompt' if add_generation_prompt else ' and the assistant answer'}): {err}. "
                "Fix tokenizer.chat_template (or chat_template_kwargs), or pass a prompt_format template string with "
                "{context} and {question} that matches your training data."
            ) from err

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _token_boundary(self, text: str) -> str:
        """``text`` cut back to the last token boundary that an answer after it cannot merge across.

        That is the text of the tokens ``text`` shares with ``text + start`` for every start in
        :data:`ANSWER_STARTS`: what TRL's ``common_prefix_length`` keeps as the prompt of a tokenized
        prompt-completion example. ``text`` itself when no answer start merges with its end (the usual case). Only the
        last :data:`_WINDOW` characters are tokenized (a merge across the end is local), so long contexts cost little.
        """
        key = text[-_KEY:]
        if key not in self._cuts:
            self._cuts[key] = self._cut(text[-_WINDOW:])
        return text[: len(text) - self._cuts[key]]

    def _cut(self, end: str) -> int:
        """How many characters :meth:`_token_boundary` cuts off the end of a text that ends with ``end``."""
        ids, *joined = self._ids([end] + [end + start for start in ANSWER_STARTS])
        keep = min(common_prefix_length(ids, other) for other in joined)
        if keep == len(ids):
            return 0
        for cut in range(len(end) - 1, max(-1, len(end) - 1 - _MAX_CUT), -1):
            if self._ids([end[:cut]])[0] == ids[:keep]:
                return len(end) - cut
        return 0  # no text boundary found (a tokenizer without one): encoding's own rule applies

    def prompt(self, context: str | None, question: str) -> str:
        """The prompt text for one probe variant (``context=None`` is the closed-book control).

        For a chat format: the generation prompt, cut back to the last token boundary an answer cannot merge across
        (see the module docstring); the cut characters start :meth:`continuation`.

        Raises:
            ConfigurationError: The chat template refuses the conversation (for example a template without a system
                role, given ``system_prompt``); the message quotes the template's own error.
        """
        if self.kind == "chat":
            return self._token_boundary(self._render(self._messages(context, question), add_generation_prompt=True))
        if self.kind == "template":
            assert self.template is not None  # set by from_template
            if context is None:
                if self.closed_book_template is None:
                    # No closed-book template: keep the template with an empty context.
                    return self.template.format(context="", question=question)
                return self.closed_book_template.format(question=question, context="")
            return self.template.format(context=context, question=question)
        assert self.fn is not None  # set by from_callable
        text = self.fn(context, question)
        if not isinstance(text, str):
            raise ConfigurationTypeError(f"prompt_format callable must return a string, got {type(text).__name__}.")
        return text

    def continuation(self, context: str | None, question: str, answer: str, prompt: str | None = None) -> str:
        """The text that follows :meth:`prompt` when the model gives ``answer`` (end-of-turn tokens excluded).

        For a chat format: what the template renders after ``prompt`` up to the end of the answer, with whatever it
        writes before the answer (located by rendering a marker answer, so an answer that also occurs in that text,
        say ``"in"`` after ``<think>``, is not mistaken for it).

        Raises:
            ConfigurationError: The chat template renders the answered conversation differently from the prompt, or
                drops or rewrites the answer.
        """
        if self.kind != "chat":
            return self.answer_prefix + answer
        prompt = prompt if prompt is not None else self.prompt(context, question)
        messages = self._messages(context, question)
        full = self._render(messages + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ConfigurationError(
                "The chat template renders the conversation with the answer differently from the generation prompt "
                "(the prompt is not a prefix), so the answer's tokens cannot be located. Use a template string "
                "prompt_format instead."
            )
        tail = full[len(prompt):]
        head = self._answer_head(messages, prompt, context, question)
        if head is not None and tail.startswith(head + answer):
            return head + answer
        end = tail.find(answer)  # a template that renders the answer turn depending on its content
        if end < 0:
            raise ConfigurationError(f"The chat template dropped or rewrote the answer {answer!r}; cannot score it.")
        return tail[: end + len(answer)]

    def _answer_head(
        self, messages: list[dict[str, str]], prompt: str, context: str | None, question: str
    ) -> str | None:
        """What the template writes after ``prompt`` and before the answer (``None``: not found that way)."""
        key = (prompt, context, question)
        if self._head is None or self._head[0] != key:
            marker_turn = {"role": "assistant", "content": _ANSWER_MARKER}
            marked = self._render(messages + [marker_turn], add_generation_prompt=False)
            rest = marked[len(prompt):] if marked.startswith(prompt) else ""
            head = rest.split(_ANSWER_MARKER, 1)[0] if _ANSWER_MARKER in rest else None
            self._head = (key, head)
        return self._head[1]

    @property
    def adds_special_tokens(self) -> bool:
        """Whether prompts are tokenized with the tokenizer's special tokens (BOS) added.

        Chat templates write their special tokens into the text themselves, so they are tokenized with
        ``add_special_tokens=False``; plain text prompts get the tokenizer's BOS like ``SFTTrainer`` gives them.
        """
        return self.kind != "chat"


def resolve_prompt_format(prompt_format: Any, tokenizer: Any, **chat_options: Any) -> PromptFormat:
    """Turn the user-facing ``prompt_format`` argument into a :class:`PromptFormat`.

    Args:
        prompt_format: ``"chat"``, a preset name, a template string with ``{context}``/``{question}``,
            a callable, or a :class:`PromptFormat`.
        tokenizer: The tokenizer (used by ``"chat"``).
        **chat_options: ``system_prompt``, ``chat_template_kwargs`` for the chat format.
    """
    if isinstance(prompt_format, PromptFormat):
        if prompt_format.tokenizer is None:
            prompt_format.tokenizer = tokenizer
        return prompt_format
    if callable(prompt_format):
        return PromptFormat.from_callable(prompt_format, tokenizer=tokenizer)
    if not isinstance(prompt_format, str):
        raise ConfigurationTypeError(
            f"prompt_format must be 'chat', a preset ({sorted(PROMPT_PRESETS)}), a template string, a callable or "
            f"a PromptFormat; got {type(prompt_format).__name__}."
        )
    if prompt_format == "chat":
        return PromptFormat.chat(tokenizer, **chat_options)
    if prompt_format in PROMPT_PRESETS or "{" in prompt_format:
        return PromptFormat.from_template(prompt_format, tokenizer=tokenizer)
    raise ConfigurationError(
        f"Unknown prompt_format {prompt_format!r}: use 'chat', a preset ({sorted(PROMPT_PRESETS)}), a template "
        "string containing {context} and {question}, or a callable(context, question) -> str."
    )
