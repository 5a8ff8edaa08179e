"""The built-in datasets: `prompt` (PPO/GRPO), `prompt_answer` (SFT), `paired` (RW/DPO).

Each reads a JSONL file (one JSON object per line; blank lines are skipped) or a built-in name
(`builtin:reverse`, `builtin:sort:eval`, ... see `realflow.data.sources`), tokenizes every row once
and returns ONE-sample `SequenceSample`s: `dataset[i].ids == [i]` for i in `range(len(dataset))`.
Metadata hold `prompt` (the original prompt text), `row` (= i) and the other row fields (e.g.
`answer` and `task` for rule rewards); only `paired` leaves out the answer fields it turns into
tokens. Rows whose extra fields differ lose the non-shared ones when gathered into a batch.

Token layout (BOS only when the tokenizer has one, EOS likewise; see realflow.data.tokenizer):

    packed_prompts    = [BOS] + prompt
    packed_input_ids  = [BOS] + prompt + answer + [EOS]
    prompt_mask       = True on [BOS] + prompt, False on answer + [EOS]

Files are UTF-8 (a byte order mark at the start is ignored). Row problems (bytes that are not
UTF-8, invalid JSON, a missing or wrong-typed field) raise `DatasetError` with
`file:line: field 'name': ...`; with `skip_bad_rows=True` they are skipped, logged and counted in
`n_bad` (messages in `bad_rows`). `max_length` bounds every sequence: longer rows are dropped
(`n_dropped`), or with `truncate=True` cut (`n_truncated`): prompts lose their left end (BOS kept),
prompt+answer sequences lose their right end (the answer's tail and EOS). A row whose prompt alone
does not leave room for one answer token is dropped even when truncating.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from realflow.api.data import SequenceSample
from realflow.api.registry import DATASETS
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


class _TokenizedDataset:
    """Shared machinery: read rows, check fields, tokenize, apply max_length, build samples.

    Subclasses set `consumed_fields` (fields turned into tokens, kept out of metadata) and
    implement `_check`, `_texts` and `_build`.
    """

    consumed_fields: tuple[str, ...] = ()
    paired_rows = False  # built-in sources: generate chosen/rejected

    def __init__(
        self,
        path: str,
        tokenizer: PreTrainedTokenizerFast,
        max_length: int | None = None,
        truncate: bool = False,
        skip_bad_rows: bool = False,
        **extra: Any,
    ):
        self.path = str(path)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate = truncate
        self.skip_bad_rows = skip_bad_rows
        self.n_bad = self.n_dropped = self.n_truncated = 0
        self.bad_rows: list[str] = []
        self._bos, self._eos = bos_ids(tokenizer), eos_ids(tokenizer)
        if max_length is not None and max_length < len(self._bos) + 1:
            raise DatasetError(f"max_length ({max_length}) must be at least {len(self._bos) + 1}")
        rows = self._checked_rows(self._read(extra))
        self._samples: list[tuple[Sequences, dict[str, Any]]] = []
        for (line, row), tokens in zip(rows, self._tokenize(rows)):
            built = self._build(row, tokens)
            if built is None:
                self.n_dropped += 1
                logger.debug("%s:%d: dropped (over max_length %s)", self.path, line, max_length)
                continue
            sequences, truncated = built
            self.n_truncated += int(truncated)
            self._samples.append((sequences, self._metadata(row)))
        self._log_summary(len(rows))
        if not self._samples:
            raise DatasetError(f"dataset '{self.path}' has no usable rows ({self._counts()})")

    # ---- reading --------------------------------------------------------------------------------

    def _read(self, extra: dict[str, Any]) -> list[tuple[int, Row | RowError]]:
        if not is_builtin_source(self.path):
            if extra:
                raise DatasetError(
                    f"unknown dataset options {sorted(extra)} for file '{self.path}' "
                    f"(options {list(_BUILTIN_OPTIONS)} apply to built-in datasets only)"
                )
            return read_jsonl(self.path)
        unknown = sorted(set(extra) - set(_BUILTIN_OPTIONS))
        if unknown:
            raise DatasetError(
                f"unknown dataset options {unknown} for '{self.path}'; known: {list(_BUILTIN_OPTIONS)}"
            )
        return list(builtin_rows(self.path, self.paired_rows, **extra))

    def _checked_rows(self, rows: list[tuple[int, Row | RowError]]) -> list[tuple[int, Row]]:
        good: list[tuple[int, Row]] = []
        for line, row in rows:
            try:
                if isinstance(row, RowError):
                    raise row
                self._check_prompt(row)
                self._check(row)
            except RowError as e:
                message = row_error_message(self.path, line, e)
                if not self.skip_bad_rows:
                    raise DatasetError(message) from None
                self.n_bad += 1
                if len(self.bad_rows) < _MAX_KEPT_MESSAGES:
                    self.bad_rows.append(message)
                logger.warning("skipping bad row: %s", message)
                continue
            good.append((line, row))
        return good

    @staticmethod
    def _check_prompt(row: Row) -> None:
        _require_str(row, "prompt")

    def _check(self, row: Row) -> None:
        """Raise RowError(message, field) for a bad field (prompt is already checked)."""

    # ---- tokenizing -----------------------------------------------------------------------------

    def _texts(self, row: Row) -> list[str]:
        """The texts of a row to tokenize (without special tokens), prompt first."""
        raise NotImplementedError

    def _tokenize(self, rows: list[tuple[int, Row]]) -> list[list[list[int]]]:
        """Per row, the token ids of each of its `_texts`, in one batched tokenizer call."""
        per_row = [self._texts(row) for _, row in rows]
        flat = [t for texts in per_row for t in texts]
        ids = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        out, start = [], 0
        for texts in per_row:
            out.append([list(x) for x in ids[start : start + len(texts)]])
            start += len(texts)
        return out

    def _build(self, row: Row, tokens: list[list[int]]) -> tuple[Sequences, bool] | None:
        """Token sequences per key and whether they were truncated; None drops the row."""
        raise NotImplementedError

    def _prompt_answer(self, prompt: list[int], answer: list[int]) -> tuple[list[int], int, bool]:
        """`[BOS] + prompt + answer + [EOS]` cut to max_length; returns (ids, prompt_len,
        truncated), or raises _TooLong when the row must be dropped."""
        head = self._bos + prompt
        ids = head + answer + self._eos
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, len(head), False
        if not self.truncate or len(head) >= self.max_length:
            raise _TooLong
        return ids[: self.max_length], len(head), True

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
            dtype = torch.bool if key == "prompt_mask" else torch.long
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


class _TooLong(Exception):
    """A row over max_length that cannot (or may not) be truncated."""


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


@DATASETS.register("prompt")
class PromptDataset(_TokenizedDataset):
    """Prompts for generation (PPO, GRPO).

    Row: `{"prompt": str, ...}`; other fields (e.g. `"answer"`, `"task"` for rule rewards) go to
    metadata. Sample keys: `packed_prompts` (L,) int64 = [BOS] + prompt tokens. With max_length and
    truncate=True, a long prompt keeps BOS and its last max_length - 1 tokens (metadata `prompt`
    stays the full text).
    """

    def _texts(self, row: Row) -> list[str]:
        return [row["prompt"]]

    def _build(self, row: Row, tokens: list[list[int]]) -> tuple[Sequences, bool] | None:
        ids = self._bos + tokens[0]
        if self.max_length is None or len(ids) <= self.max_length:
            return {"packed_prompts": ids}, False
        if not self.truncate:
            return None
        keep = self.max_length - len(self._bos)
        return {"packed_prompts": self._bos + tokens[0][len(tokens[0]) - keep :]}, True


@DATASETS.register("prompt_answer")
class PromptAnswerDataset(_TokenizedDataset):
    """Prompt-answer pairs for supervised fine-tuning (SFT).

    Row: `{"prompt": str, "answer": str, ...}`; every field (the answer too, for scoring
    generations in evaluation) goes to metadata. Sample keys:
    `packed_input_ids` (L,) int64 = [BOS] + prompt + answer + [EOS] and `prompt_mask` (L,) bool,
    True on [BOS] + prompt. With max_length and truncate=True the answer end (EOS first) is cut.
    """

    def _check(self, row: Row) -> None:
        _require_str(row, "answer")

    def _texts(self, row: Row) -> list[str]:
        return [row["prompt"], row["answer"]]

    def _build(self, row: Row, tokens: list[list[int]]) -> tuple[Sequences, bool] | None:
        try:
            ids, n_prompt, truncated = self._prompt_answer(tokens[0], tokens[1])
        except _TooLong:
            return None
        mask = [1] * n_prompt + [0] * (len(ids) - n_prompt)
        return {"packed_input_ids": ids, "prompt_mask": mask}, truncated


@DATASETS.register("paired")
class PairedDataset(_TokenizedDataset):
    """Preference pairs for reward modelling and DPO.

    Row: `{"prompt": str, "chosen": str, "rejected": str, ...}`, or several pairs per prompt as
    `{"prompt": str, "pos_answers": [str, ...], "neg_answers": [str, ...]}` (equal lengths; pair j is
    (pos_answers[j], neg_answers[j])). Other fields go to metadata, plus `n_pairs`.

    One sample holds 2 * n_pairs sequences under `packed_input_ids`, in the order
    [chosen_1, rejected_1, chosen_2, rejected_2, ...], each [BOS] + prompt + answer + [EOS]
    (seqlens[key][0] lists their lengths), and `prompt_mask` aligned with them. A row with any
    sequence over max_length is dropped whole, or with truncate=True every long sequence loses its
    end; a row where truncation makes a chosen and its rejected sequence equal is dropped.
    """

    consumed_fields = ("chosen", "rejected", "pos_answers", "neg_answers")
    paired_rows = True

    def _check(self, row: Row) -> None:
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
        else:
            _require_str(row, "chosen")
            _require_str(row, "rejected")

    @staticmethod
    def _answers(row: Row) -> list[str]:
        """[chosen_1, rejected_1, chosen_2, rejected_2, ...]."""
        if "pos_answers" in row:
            return [a for pair in zip(row["pos_answers"], row["neg_answers"]) for a in pair]
        return [row["chosen"], row["rejected"]]

    def _texts(self, row: Row) -> list[str]:
        return [row["prompt"], *self._answers(row)]

    def _build(self, row: Row, tokens: list[list[int]]) -> tuple[Sequences, bool] | None:
        seqs, masks, any_truncated = [], [], False
        for answer in tokens[1:]:
            try:
                ids, n_prompt, truncated = self._prompt_answer(tokens[0], answer)
            except _TooLong:
                return None
            seqs.append(ids)
            masks.append([1] * n_prompt + [0] * (len(ids) - n_prompt))
            any_truncated |= truncated
        if any_truncated and any(seqs[j] == seqs[j + 1] for j in range(0, len(seqs), 2)):
            return None  # truncation cut away the only difference within a pair
        return {"packed_input_ids": seqs, "prompt_mask": masks}, any_truncated

    def _metadata(self, row: Row) -> dict[str, Any]:
        return {**super()._metadata(row), "n_pairs": len(self._answers(row)) // 2}
