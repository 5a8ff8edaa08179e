"""Chat data: conversations in the `messages` format, rendered with a chat template.

A conversation is a list of messages `{"role": str, "content": str, ...}` (the format of TRL and
the OpenAI API). realflow renders it with `tokenizer.apply_chat_template` and cuts the text into
spans, each belonging to one message; for a trained assistant message:

    <s><user>\\nrev 1 2 =\\n | <assistant>\\n        |  2 1</s> | \\n
    the user message        | generation prompt   | answer    | trailer

The answer span is exactly what the model writes after the generation prompt
(`add_generation_prompt=True`) at inference: the message's content and the template's end-of-turn
text, without trailing whitespace (template formatting the model never generates). Spans are
found by rendering the conversation's prefixes, so the template must be prefix-consistent: the
rendering of a conversation starts with the rendering of its first messages. Templates that
rewrite earlier turns (e.g. drop the reasoning of past assistant messages) are refused with an
error naming the message.

`DEFAULT_CHAT_TEMPLATE` is the built-in tokenizer's template (realflow.data.tokenizer):

    <s><system>\\n{content}\\n<user>\\n{content}\\n<assistant>\\n{content}</s>\\n
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from realflow.data.sources import DatasetError, RowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ANSWER_ROLE = "assistant"
SCALE_FIELD = "loss_scale"  # a message's own weight, read by the `field` loss-scale rule

# Every message: "<role>\n" + content (+ EOS for the assistant) + "\n". The headers end in a
# newline so that the built-in tokenizer, which merges a space with the next character, never
# merges a header with an answer that starts with a space.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<' + message['role'] + '>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Span:
    """A piece of a sample's text and what it is.

    `role` and `message` name the message the text belongs to (for prompt/answer rows: the prompt
    is a "user" message 0, the answer an "assistant" message 1). `answer` is True on what the model
    is trained to write; `is_last` on the last such message of the sequence. `scale` is the
    message's own `loss_scale` field (on its main span only: not on generation prompts or
    trailers), or None.
    """

    text: str
    role: str
    message: int
    answer: bool = False
    is_last: bool = False
    scale: float | None = None


def is_conversation(value: Any) -> bool:
    """Whether a row field holds messages (a list) rather than text."""
    return isinstance(value, list)


def check_messages(value: Any, field: str) -> list[dict[str, Any]]:
    """The messages of a row field; RowError(field) unless it is a non-empty list of objects with
    string `role` and `content` (and, optionally, a number `loss_scale` >= 0)."""
    if not isinstance(value, list) or not value:
        raise RowError(f"expected a non-empty list of messages, got {value!r:.80}", field)
    for i, m in enumerate(value):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise RowError(f"{where}: expected an object, got {type(m).__name__}", field)
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = type(m[key]).__name__ if key in m else "nothing"
                raise RowError(f"{where}: '{key}' must be a string, got {got}", field)
        if SCALE_FIELD in m:
            check_scale(m[SCALE_FIELD], f"{field}: {where}: '{SCALE_FIELD}'")
    return value


def check_scale(value: Any, where: str) -> float:
    """A loss-scale weight: a finite number >= 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0.0 <= float(value) < float("inf"):
        raise RowError(f"{where}: expected a finite number >= 0, got {value!r:.40}")
    return float(value)


def resolve_template(tokenizer: PreTrainedTokenizerFast, chat_template: str | None) -> str:
    """The template to render with: `chat_template` (jinja text, or a path to a file holding
    it) when given, else the tokenizer's own; DatasetError when there is neither."""
    if chat_template is None:
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise DatasetError(
                "chat rows need a chat template, but the tokenizer has none: give one with "
                "dataset.args.chat_template=<file.jinja or template text> (the built-in "
                "tokenizer's template is realflow.data.chat.DEFAULT_CHAT_TEMPLATE)"
            )
        if not isinstance(own, str):
            raise DatasetError(
                f"the tokenizer has several chat templates ({sorted(own)}); pick one with "
                "dataset.args.chat_template=<file.jinja or template text>"
            )
        return own
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    path = Path(chat_template).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"chat_template '{chat_template}' is neither a jinja template nor a file"
        )
    return path.read_text(encoding="utf-8")


def render(
    tokenizer: PreTrainedTokenizerFast,
    template: str,
    messages: list[dict[str, Any]],
    generation_prompt: bool,
    field: str,
) -> str:
    """The text of `messages` under `template` (our own `loss_scale` keys left out)."""
    clean = [{k: v for k, v in m.items() if k != SCALE_FIELD} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            clean, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # the template's own checks (e.g. roles must alternate)
        raise RowError(f"the chat template failed: {type(e).__name__}: {e}", field) from None
    if not isinstance(text, str):
        raise RowError(f"the chat template gave a {type(text).__name__}, not text", field)
    return text


def conversation_spans(
    tokenizer: PreTrainedTokenizerFast,
    template: str,
    messages: list[dict[str, Any]],
    answers: set[int],
    field: str,
) -> list[Span]:
    """The rendered conversation as spans; messages whose index is in `answers` (assistant
    messages) give a generation prompt, an answer and a trailer span (see the module doc)."""
    last = max(answers, default=-1)
    spans: list[Span] = []
    done = ""

    def add(upto: str, what: str, **span: Any) -> None:
        nonlocal done
        if not upto.startswith(done):
            raise RowError(
                f"the chat template is not prefix-consistent: its rendering of {what} does not "
                "start with its rendering of the messages before; realflow finds the answer "
                "tokens by rendering prefixes (give another template with "
                "dataset.args.chat_template=...)",
                field,
            )
        spans.append(Span(upto[len(done) :], **span))
        done = upto

    for i, m in enumerate(messages):
        role, scale, what = m["role"], m.get(SCALE_FIELD), f"messages[:{i + 1}]"
        text = render(tokenizer, template, messages[: i + 1], False, field)
        if i not in answers:
            add(text, what, role=role, message=i, scale=scale)
            continue
        head = render(tokenizer, template, messages[:i], True, field)
        add(head, f"messages[:{i}] with the generation prompt", role=role, message=i)
        add(text, what, role=role, message=i)  # checks the prefix; split below
        body = spans.pop().text
        n = len(body.rstrip())
        spans.append(Span(body[:n], role, i, answer=True, is_last=i == last, scale=scale))
        spans.append(Span(body[n:], role, i))
    return [s for s in spans if s.text or s.answer]


def answer_indices(messages: list[dict[str, Any]], start: int = 0) -> set[int]:
    """Indices of the assistant messages at or after `start`."""
    return {i for i, m in enumerate(messages) if i >= start and m["role"] == ANSWER_ROLE}


def split_shared_prompt(
    chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt, chosen completion, rejected completion): the prompt is the longest run of equal
    leading messages (TRL's implicit prompt)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]
