"""The built-in datasets: `prompt` (PPO/GRPO), `prompt_answer` (SFT), `paired` (RW/DPO).

Each reads a JSONL file (one JSON object per line; blank lines are skipped) or a built-in name
(`builtin:reverse`, `builtin:sort:eval`, ... see `realflow.data.sources`), tokenizes every row once
and returns ONE-sample `SequenceSample`s: `dataset[i].ids == [i]` for i in `range(len(dataset))`.
Metadata hold `prompt` (the original prompt text), `row` (= i) and the other row fields (e.g.
`answer` and `task` for rule rewards); only `paired` leaves out the answer fields it turns into
tokens. Rows whose extra fields differ lose the non-shared ones when gathered into a batch.

Token layout of text rows (BOS only when the tokenizer has one, EOS likewise; see
realflow.data.tokenizer):

    packed_prompts    = [BOS] + prompt
    packed_input_ids  = [BOS] + prompt + answer + [EOS]
    prompt_mask       = True on [BOS] + prompt, False on answer + [EOS]
    loss_scale        = the weight of each token (only with a loss_scale rule; float32)

Rows may instead hold conversations in the `messages` format (realflow.data.chat): they are
rendered with the chat template (the tokenizer's, or the `chat_template` option), which writes
every special token itself, and the answers are the assistant messages. Each token's weight comes
from a loss-scale rule (realflow.data.loss_scale; `answer` by default); `prompt_mask` is True
where the weight is 0. With the `loss_scale` option (a rule name, with `loss_scale_args`) samples
also carry `loss_scale`.

Files are UTF-8 (a byte order mark at the start is ignored). Row problems (bytes that are not
UTF-8, invalid JSON, a missing or wrong-typed field) raise `DatasetError` with
`file:line: field 'name': ...`; with `skip_bad_rows=True` they are skipped, logged and counted in
`n_bad` (messages in `bad_rows`). `max_length` bounds every sequence: longer rows are dropped
(`n_dropped`), or with `truncate=True` cut (`n_truncated`): prompts lose their left end (BOS kept),
prompt+answer sequences lose their right end (the answer's tail and EOS). A row left with no
token to train on is dropped even when truncating.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch

from realflow.api.data import SequenceSample
from realflow.api.registry import DATASETS
from realflow.data import chat
from realflow.data.chat import Span
from realflow.data.loss_scale import Pieces, build_rule, span_pieces, unit_weights
from realflow.data.sources import (
    DatasetError,
    Row,
    RowError,
    builtin_rows,
    is_builtin_source,
    read_jsonl,
    row_error_message,
)
from realflow.data.tokenizer import bos_ids, eos_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

__all__ = ["DatasetError", "PairedDataset", "PromptAnswerDataset", "PromptDataset"]

# Per key: one token list (one sequence) or several (a group of sequences in one sample).
Sequences = dict[str, list[list[int]] | list[int]]
_MAX_KEPT_MESSAGES = 100
_BUILTIN_OPTIONS = ("n_rows", "seed")
_FILE_OPTIONS = ("chat_template", "loss_scale", "loss_scale_args")
_DTYPES = {"prompt_mask": torch.bool, "loss_scale": torch.float32}


@dataclasses.dataclass
class _Unit:
    """A text tokenized on its own, its characters' loss-scale pieces, and ids added around it."""

    text: str
    pieces: Pieces
    before: list[int]
    after: list[int]


_Sequence = list[_Unit]  # the texts of one sequence, in order


@dataclasses.dataclass
class _Encoded:
    """One tokenized sequence and its per-token loss scale (empty for prompt datasets)."""

    ids: list[int]
    weights: list[float]
    unit_lens: list[int]  # tokens of each text (with the ids added around it)


class _TokenizedDataset:
    """Shared machinery: read rows, check them and cut them into texts (`_prepare`), tokenize
    every text in one call, weigh the tokens, apply max_length (`_build`), hold the samples.

    Subclasses set `consumed_fields` (fields turned into tokens, kept out of metadata) and
    `weighs_tokens` (whether samples have answers to weigh), and implement `_prepare`, `_build`.
    """

    consumed_fields: tuple[str, ...] = ()
    paired_rows = False  # built-in sources: generate chosen/rejected
    weighs_tokens = True

    def __init__(
        self,
        path: str,
        tokenizer: PreTrainedTokenizerFast,
        max_length: int | None = None,
        truncate: bool = False,
        skip_bad_rows: bool = False,
        chat_template: str | None = None,
        loss_scale: str | None = None,
        loss_scale_args: dict[str, Any] | None = None,
        **extra: Any,
    ):
        self.path = str(path)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate = truncate
        self.skip_bad_rows = skip_bad_rows
        self.loss_scale = loss_scale
        self.n_bad = self.n_dropped = self.n_truncated = 0
        self.bad_rows: list[str] = []
        self._bos, self._eos = bos_ids(tokenizer), eos_ids(tokenizer)
        self._chat_template, self._template = chat_template, ""
        if max_length is not None and max_length < len(self._bos) + 1:
            raise DatasetError(f"max_length ({max_length}) must be at least {len(self._bos) + 1}")
        self.rule = self._loss_scale_rule(loss_scale, loss_scale_args)
        prepared = []
        for line, row in self._read(extra):
            try:
                if isinstance(row, RowError):
                    raise row
                prepared.append((line, row, *self._prepare(row)))
            except RowError as e:
                self._bad_row(line, e)
        encoded = self._encode([units for _, _, units, _ in prepared])
        self._samples: list[tuple[Sequences, dict[str, Any]]] = []
        for (line, row, _, meta), seqs in zip(prepared, encoded):
            try:
                built = self._build(row, seqs)
            except RowError as e:
                self._bad_row(line, e)
                continue
            if built is None:
                self.n_dropped += 1
                logger.debug("%s:%d: dropped (over max_length %s)", self.path, line, max_length)
                continue
            sequences, truncated = built
            self.n_truncated += int(truncated)
            self._samples.append((sequences, {**self._metadata(row), **meta}))
        self._log_summary(len(prepared))
        if not self._samples:
            raise DatasetError(f"dataset '{self.path}' has no usable rows ({self._counts()})")

    def _loss_scale_rule(self, name: str | None, args: dict[str, Any] | None) -> Any:
        """The loss-scale rule (`answer` when none is named, with no `loss_scale` key)."""
        if not self.weighs_tokens:
            if name is not None or args:
                raise DatasetError(
                    f"{type(self).__name__} holds prompts only: it takes no loss_scale"
                )
            return None
        if args and name is None:
            raise DatasetError(f"loss_scale_args {args} given without a loss_scale rule")
        try:
            return build_rule(name or "answer", args)
        except ValueError as e:  # RegistryError too: a miss lists the known rules
            raise DatasetError(f"loss_scale: {e}") from e

    def _bad_row(self, line: int, err: RowError) -> None:
        message = row_error_message(self.path, line, err)
        if not self.skip_bad_rows:
            raise DatasetError(message) from None
        self.n_bad += 1
        if len(self.bad_rows) < _MAX_KEPT_MESSAGES:
            self.bad_rows.append(message)
        logger.warning("skipping bad row: %s", message)

    # ---- reading --------------------------------------------------------------------------------

    def _read(self, extra: dict[str, Any]) -> list[tuple[int, Row | RowError]]:
        if not is_builtin_source(self.path):
            if extra:
                raise DatasetError(
                    f"unknown dataset options {sorted(extra)} for file '{self.path}'; known: "
                    f"{list(_FILE_OPTIONS)} (options {list(_BUILTIN_OPTIONS)} apply to built-in "
                    "datasets only)"
                )
            return read_jsonl(self.path)
        unknown = sorted(set(extra) - set(_BUILTIN_OPTIONS))
        if unknown:
            raise DatasetError(
                f"unknown dataset options {unknown} for '{self.path}'; known: "
                f"{list(_FILE_OPTIONS + _BUILTIN_OPTIONS)}"
            )
        return list(builtin_rows(self.path, self.paired_rows, **extra))

    def _prepare(self, row: Row) -> tuple[list[_Sequence], dict[str, Any]]:
        """The texts of a row's sequences, and metadata to add; RowError for a bad row."""
        raise NotImplementedError

    # ---- chat rows ------------------------------------------------------------------------------

    def _conversation(
        self, messages: list[dict[str, Any]], n_prompt: int, field: str
    ) -> tuple[_Sequence, list[Span]]:
        """One sequence of a conversation whose assistant messages from `n_prompt` on are
        answers; the spans come back too (for metadata)."""
        answers = chat.answer_indices(messages, n_prompt)
        if not answers:
            raise RowError("has no assistant message after the prompt to train on", field)
        if not self.rule.reads_fields and any(chat.SCALE_FIELD in m for m in messages):
            raise RowError(
                f"a message has '{chat.SCALE_FIELD}', which the loss scale rule "
                f"'{self.loss_scale or 'answer'}' does not read: use the 'field' rule",
                field,
            )
        spans = chat.conversation_spans(self.tokenizer, self.template(), messages, answers, field)
        return [self._unit(spans)], spans

    def template(self) -> str:
        """The chat template (resolved at the first chat row)."""
        if not self._template:
            self._template = chat.resolve_template(self.tokenizer, self._chat_template)
        return self._template

    def _unit(
        self, spans: list[Span], before: list[int] | None = None, after: list[int] | None = None
    ) -> _Unit:
        pieces = [p for s in spans for p in span_pieces(self.rule, s)] if self.rule else []
        return _Unit("".join(s.text for s in spans), pieces, before or [], after or [])

    # ---- tokenizing -----------------------------------------------------------------------------

    def _encode(self, rows: list[list[_Sequence]]) -> list[list[_Encoded]]:
        """Per row, per sequence: (ids, weights), every text tokenized in one batched call."""
        units = [u for seqs in rows for seq in seqs for u in seq]
        enc = (
            self.tokenizer(
                [u.text for u in units], add_special_tokens=False, return_offsets_mapping=True
            )
            if units
            else {"input_ids": [], "offset_mapping": []}
        )
        done = iter(zip(units, enc["input_ids"], enc["offset_mapping"]))
        out = []
        for seqs in rows:
            row = []
            for seq in seqs:
                enc_seq = _Encoded([], [], [])
                for unit, tokens, offsets in (next(done) for _ in seq):
                    ids = unit.before + list(tokens) + unit.after
                    enc_seq.ids += ids
                    enc_seq.unit_lens.append(len(ids))
                    if self.rule is not None:
                        n = (len(unit.before), len(unit.after))
                        enc_seq.weights += unit_weights(unit.pieces, offsets, *n)
                row.append(enc_seq)
            out.append(row)
        return out

    def _build(self, row: Row, seqs: list[_Encoded]) -> tuple[Sequences, bool] | None:
        """Token sequences per key and whether they were truncated; None drops the row."""
        raise NotImplementedError

    def _answer_sequence(self, seq: _Encoded) -> tuple[list[int], list[float], bool] | None:
        """`seq` cut to max_length: (ids, weights, truncated), or None to drop it: too long
        without truncate, or no token left to train on."""
        ids, weights, truncated = seq.ids, seq.weights, False
        if self.max_length is not None and len(ids) > self.max_length:
            if not self.truncate:
                return None
            ids, weights, truncated = ids[: self.max_length], weights[: self.max_length], True
        if not any(w > 0 for w in weights[1:]):  # the first token is never predicted
            if truncated:
                return None
            raise RowError("has no token to train on (every loss scale past the first is 0)")
        return ids, weights, truncated

    def _answer_keys(self, ids: list[int], weights: list[float]) -> dict[str, list[Any]]:
        keys: dict[str, list[Any]] = {
            "packed_input_ids": ids,
            "prompt_mask": [w == 0 for w in weights],
        }
        if self.loss_scale is not None:
            keys["loss_scale"] = weights
        return keys

    def _metadata(self, row: Row) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in self.consumed_fields}

    # ---- access ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> SequenceSample:
        """One sample with id `i`; see the class docstring for its keys."""
        if not 0 <= i < len(self._samples):
            raise IndexError(f"row {i} out of range for a dataset of {len(self)} rows")
        sequences, meta = self._samples[i]
        tensors: dict[str, list[Any]] = {}
        for key, seq in sequences.items():
            dtype = _DTYPES.get(key, torch.long)
            if seq and isinstance(seq[0], list):
                tensors[key] = [[torch.tensor(s, dtype=dtype) for s in seq]]
            else:
                tensors[key] = [torch.tensor(seq, dtype=dtype)]
        metadata = {k: [v] for k, v in meta.items()}
        metadata["row"] = [i]
        return SequenceSample.from_sequences([i], tensors, metadata)

    def _counts(self) -> str:
        return f"{self.n_bad} bad, {self.n_dropped} dropped, {self.n_truncated} truncated"

    def _log_summary(self, n_read: int) -> None:
        logger.info(
            "%s '%s': %d rows kept of %d good rows (%s; max_length=%s)",
            type(self).__name__,
            self.path,
            len(self._samples),
            n_read,
            self._counts(),
            self.max_length,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.path}', {len(self)} rows, {self._counts()})"


def _require_str(row: Row, field: str) -> str:
    if field not in row:
        raise RowError(f"missing (row has {sorted(row)})", field)
    value = row[field]
    if not isinstance(value, str):
        raise RowError(f"expected a string, got {type(value).__name__}", field)
    return value


def _require_str_list(row: Row, field: str) -> list[str]:
    if field not in row:
        raise RowError(f"missing (row has {sorted(row)})", field)
    value = row[field]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RowError(f"expected a non-empty list of strings, got {value!r:.80}", field)
    return value


def _chat_prompt(row: Row) -> tuple[str, list[dict[str, Any]]] | None:
    """(field, messages) of a row's conversation prompt: `messages`, or `prompt` as a list;
    None for a text prompt."""
    if "messages" in row:
        if "prompt" in row:
            raise RowError("give either messages or prompt, not both", "messages")
        return "messages", chat.check_messages(row["messages"], "messages")
    if chat.is_conversation(row.get("prompt")):
        return "prompt", chat.check_messages(row["prompt"], "prompt")
    return None


def _text_before_answer(spans: list[Span], last: bool) -> str:
    """The rendered text before the first (or last) answer: a prompt to generate it from."""
    answers = [i for i, s in enumerate(spans) if s.answer]
    return "".join(s.text for s in spans[: answers[-1 if last else 0]])


@DATASETS.register("prompt")
class PromptDataset(_TokenizedDataset):
    """Prompts for generation (PPO, GRPO).

    Row: `{"prompt": str, ...}`, or a conversation: `{"messages": [...]}` or `{"prompt": [...]}`
    rendered with the chat template and its generation prompt (a conversation ending with an
    assistant message loses it, and its content becomes the `answer` metadata unless the row has
    one). Other fields (e.g. `"answer"`, `"task"` for rule rewards) go to metadata; `prompt` holds
    the text (the rendered text for conversations). Sample keys: `packed_prompts` (L,) int64 =
    [BOS] + prompt tokens (a conversation: its rendering, specials as the template writes them).
    With max_length and truncate=True, a long prompt keeps its first token when it is BOS and its
    last tokens.
    """

    consumed_fields = ("messages",)
    weighs_tokens = False

    def _prepare(self, row: Row) -> tuple[list[_Sequence], dict[str, Any]]:
        conversation = _chat_prompt(row)
        if conversation is None:
            return [[_Unit(_require_str(row, "prompt"), [], self._bos, [])]], {}
        field, messages = conversation
        meta: dict[str, Any] = {}
        if messages[-1]["role"] == chat.ANSWER_ROLE:
            if len(messages) == 1:
                raise RowError("has only an assistant message; a prompt needs more", field)
            meta = {} if "answer" in row else {"answer": messages[-1]["content"]}
            messages = messages[:-1]
        text = chat.render(self.tokenizer, self.template(), messages, True, field)
        return [[_Unit(text, [], [], [])]], {**meta, "prompt": text}

    def _build(self, row: Row, seqs: list[_Encoded]) -> tuple[Sequences, bool] | None:
        ids = seqs[0].ids
        if self.max_length is None or len(ids) <= self.max_length:
            return {"packed_prompts": ids}, False
        if not self.truncate:
            return None
        head = ids[:1] if self._bos and ids[:1] == self._bos else []
        keep = self.max_length - len(head)
        return {"packed_prompts": head + ids[len(ids) - keep :]}, True


@DATASETS.register("prompt_answer")
class PromptAnswerDataset(_TokenizedDataset):
    """Prompt-answer pairs for supervised fine-tuning (SFT).

    Row: `{"prompt": str, "answer": str, ...}`, or a conversation: `{"messages": [...]}` (every
    assistant message is an answer) or `{"prompt": [...], "completion": [...]}` (the assistant
    messages of the completion are). Every other field (the answer too, for scoring generations in
    evaluation) goes to metadata; conversations add `prompt` (the text before the last answer) and
    `answer` (its content). A text row may carry `loss_scale` for the `field` rule: a number
    (the answer's weight) or one weight per answer token and EOS.

    Sample keys: `packed_input_ids` (L,) int64 = [BOS] + prompt + answer + [EOS] (a conversation:
    its rendering), `prompt_mask` (L,) bool, True where the loss scale is 0 (by default: [BOS] +
    prompt, everything but the answers of a conversation), and with a `loss_scale` rule
    `loss_scale` (L,) float32. With max_length and truncate=True the sequence loses its end.
    """

    consumed_fields = ("messages", "completion", chat.SCALE_FIELD)

    def _prepare(self, row: Row) -> tuple[list[_Sequence], dict[str, Any]]:
        conversation = _chat_prompt(row)
        if conversation is not None:
            field, messages = conversation
            if chat.SCALE_FIELD in row:
                raise RowError("conversations carry loss scales on messages", chat.SCALE_FIELD)
            n_prompt = 0
            if field == "prompt":
                messages = messages + chat.check_messages(row.get("completion"), "completion")
                n_prompt, field = len(row["prompt"]), "completion"
            seq, spans = self._conversation(messages, n_prompt, field)
            answer = [s for s in spans if s.answer][-1]
            meta = {"prompt": _text_before_answer(spans, last=True)}
            return [seq], {**meta, "answer": messages[answer.message]["content"]}
        prompt, answer = _require_str(row, "prompt"), _require_str(row, "answer")
        scale = self._row_scale(row)
        spans = (
            Span(prompt, "user", 0),
            Span(answer, chat.ANSWER_ROLE, 1, answer=True, is_last=True,
                 scale=scale if isinstance(scale, float) else None),
        )  # fmt: skip
        return [
            [self._unit([spans[0]], before=self._bos), self._unit([spans[1]], after=self._eos)]
        ], {}

    def _row_scale(self, row: Row) -> float | list[float] | None:
        """A text row's `loss_scale` field: a number, or one weight per answer token and EOS."""
        if chat.SCALE_FIELD not in row:
            return None
        if not self.rule.reads_fields:
            raise RowError(
                f"the loss scale rule '{self.loss_scale or 'answer'}' does not read this field: "
                "use the 'field' rule",
                chat.SCALE_FIELD,
            )
        value = row[chat.SCALE_FIELD]
        if isinstance(value, list):
            return [chat.check_scale(v, f"field '{chat.SCALE_FIELD}'") for v in value]
        return chat.check_scale(value, f"field '{chat.SCALE_FIELD}'")

    def _build(self, row: Row, seqs: list[_Encoded]) -> tuple[Sequences, bool] | None:
        seq = seqs[0]
        token_scales = row.get(chat.SCALE_FIELD)
        if isinstance(token_scales, list) and len(seq.unit_lens) == 2:  # a text row
            n_prompt, n_answer = seq.unit_lens
            if len(token_scales) != n_answer:
                raise RowError(
                    f"has {len(token_scales)} weights, but the answer has {n_answer} tokens"
                    + (f" ({n_answer - 1} and EOS)" if self._eos else ""),
                    chat.SCALE_FIELD,
                )
            weights = seq.weights[:n_prompt] + [float(w) for w in token_scales]
            seq = _Encoded(seq.ids, weights, seq.unit_lens)
        cut = self._answer_sequence(seq)
        if cut is None:
            return None
        ids, weights, truncated = cut
        return self._answer_keys(ids, weights), truncated


@DATASETS.register("paired")
class PairedDataset(_TokenizedDataset):
    """Preference pairs for reward modelling and DPO.

    Row: `{"prompt": str, "chosen": str, "rejected": str, ...}`, or several pairs per prompt as
    `{"prompt": str, "pos_answers": [str, ...], "neg_answers": [str, ...]}` (equal lengths; pair j is
    (pos_answers[j], neg_answers[j])), or conversations (TRL's format): `{"chosen": [...],
    "rejected": [...]}` whose shared leading messages are the prompt, or with an explicit
    `"prompt": [...]`; the assistant messages after the prompt are the answers. Other fields go to
    metadata, plus `n_pairs` (and `prompt`, the rendered prompt, for conversations).

    One sample holds 2 * n_pairs sequences under `packed_input_ids`, in the order
    [chosen_1, rejected_1, chosen_2, rejected_2, ...], each [BOS] + prompt + answer + [EOS]
    (seqlens[key][0] lists their lengths), and `prompt_mask` (and with a rule `loss_scale`)
    aligned with them. A row with any sequence over max_length is dropped whole, or with
    truncate=True every long sequence loses its end; a row where truncation makes a chosen and
    its rejected sequence equal is dropped.
    """

    consumed_fields = ("chosen", "rejected", "pos_answers", "neg_answers")
    paired_rows = True

    def _prepare(self, row: Row) -> tuple[list[_Sequence], dict[str, Any]]:
        if chat.is_conversation(row.get("chosen")) or chat.is_conversation(row.get("rejected")):
            return self._prepare_chat(row)
        _require_str(row, "prompt")
        if chat.SCALE_FIELD in row:
            raise RowError("text pairs take no loss scales; write messages", chat.SCALE_FIELD)
        has_single = "chosen" in row or "rejected" in row
        has_lists = "pos_answers" in row or "neg_answers" in row
        if has_single and has_lists:
            raise RowError("give either chosen/rejected or pos_answers/neg_answers, not both")
        if has_lists:
            pos = _require_str_list(row, "pos_answers")
            neg = _require_str_list(row, "neg_answers")
            if len(pos) != len(neg):
                raise RowError(
                    f"has {len(neg)} answers but pos_answers has {len(pos)}; they pair up 1:1",
                    "neg_answers",
                )
            answers = [a for pair in zip(pos, neg) for a in pair]
        else:
            answers = [_require_str(row, "chosen"), _require_str(row, "rejected")]
        prompt = self._unit([Span(row["prompt"], "user", 0)], before=self._bos)
        seqs = [
            [prompt, self._unit([Span(a, chat.ANSWER_ROLE, 1, True, True)], after=self._eos)]
            for a in answers
        ]
        return seqs, {"n_pairs": len(answers) // 2}

    def _prepare_chat(self, row: Row) -> tuple[list[_Sequence], dict[str, Any]]:
        chosen = chat.check_messages(row.get("chosen"), "chosen")
        rejected = chat.check_messages(row.get("rejected"), "rejected")
        if "prompt" in row:
            prompt = chat.check_messages(row["prompt"], "prompt")
        else:
            prompt, chosen, rejected = chat.split_shared_prompt(chosen, rejected)
        if chosen == rejected:
            raise RowError("chosen and rejected are the same conversation", "rejected")
        seq_c, spans = self._conversation(prompt + chosen, len(prompt), "chosen")
        seq_r, _ = self._conversation(prompt + rejected, len(prompt), "rejected")
        meta = {"n_pairs": 1, "prompt": _text_before_answer(spans, last=False)}
        return [seq_c, seq_r], meta

    def _build(self, row: Row, seqs: list[_Encoded]) -> tuple[Sequences, bool] | None:
        cut = [self._answer_sequence(seq) for seq in seqs]
        if any(c is None for c in cut):
            return None
        keys: dict[str, list[Any]] = {}
        for ids, weights, _ in cut:  # type: ignore[misc]
            for key, value in self._answer_keys(ids, weights).items():
                keys.setdefault(key, []).append(value)
        seq_ids = keys["packed_input_ids"]
        truncated = any(c[2] for c in cut)  # type: ignore[index]
        if truncated and any(seq_ids[j] == seq_ids[j + 1] for j in range(0, len(seq_ids), 2)):
            return None  # truncation cut away the only difference within a pair
        return keys, truncated
