"""Where dataset rows come from: JSONL files, or `builtin:<task>[:<split>]` names (tasks.py).

A row is a JSON object; `read_rows` returns `(line_number, row)` pairs and leaves field checks to
the dataset classes. Built-in names:

| name | rows |
| --- | --- |
| `builtin:<task>` or `builtin:<task>:train` | 512 rows of `<task>` (reverse, sort, copy, add) |
| `builtin:<task>:eval` | 64 rows whose prompts are not in the default train split |
| `builtin:mix[:split]` | the tasks interleaved (row i from task i % 4) |

Rows carry `task`, `prompt` and `answer`; paired datasets also get `chosen` and `rejected`.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLIT_ROWS = {"train": 512, "eval": 64}
MIX = "mix"

Row = dict[str, Any]


class DatasetError(ValueError):
    """A dataset that cannot be read: a missing file, a bad row (file:line: field), bad options."""


class RowError(ValueError):
    """A bad row: `field` is None when the row as a whole is bad (invalid JSON, not an object)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def row_error_message(path: str, line: int, err: RowError) -> str:
    """`"path:line: field 'x': message"`, the form every bad-row error takes."""
    where = f"{path}:{line}: "
    return where + (f"field '{err.field}': {err}" if err.field else str(err))


def is_builtin_source(path: str) -> bool:
    return str(path).startswith(BUILTIN_PREFIX)


def read_jsonl(path: str) -> list[tuple[int, Row | RowError]]:
    """`(line, row)` per non-blank line of a UTF-8 JSONL file (a UTF-8 byte order mark at the start
    is ignored); a line that is not UTF-8 or not a JSON object gives a RowError in place of the
    row, so the caller decides whether to raise or skip."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise DatasetError(f"dataset path '{path}' is a directory; give a JSONL file")
    if not file.is_file():
        raise DatasetError(
            f"dataset file '{path}' does not exist (give a JSONL file, or a built-in name like "
            f"'{BUILTIN_PREFIX}reverse')"
        )
    out: list[tuple[int, Row | RowError]] = []
    with file.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(_decode_line(raw, first=line_no == 1))
            except RowError as e:
                out.append((line_no, e))
                continue
            except json.JSONDecodeError as e:
                out.append((line_no, RowError(f"invalid JSON: {e.msg} (column {e.colno})")))
                continue
            if not isinstance(row, dict):
                out.append(
                    (line_no, RowError(f"a row must be a JSON object, got {type(row).__name__}"))
                )
                continue
            out.append((line_no, row))
    return out


def _decode_line(raw: bytes, first: bool) -> str:
    """One line's text; RowError names the first byte that is not UTF-8 and its column."""
    if first and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        column = len(raw[: e.start].decode("utf-8")) + 1
        raise RowError(
            f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {column}; save the file as UTF-8"
        ) from None


def builtin_rows(
    name: str, paired: bool, n_rows: int | None = None, seed: int = 0
) -> list[tuple[int, Row]]:
    """`(line, row)` pairs of a built-in dataset name (line = row index + 1), deterministic in
    (name, n_rows, seed)."""
    from realflow.data import tasks

    parts = name[len(BUILTIN_PREFIX) :].split(":")
    task, split = parts[0], (parts[1] if len(parts) > 1 else "train")
    if len(parts) > 2 or split not in BUILTIN_SPLIT_ROWS:
        raise DatasetError(
            f"bad built-in dataset name '{name}': expected '{BUILTIN_PREFIX}<task>[:train|eval]'"
        )
    if task != MIX and task not in tasks.TASKS:
        raise DatasetError(
            f"unknown built-in task '{task}' in '{name}'. Known: {', '.join([*tasks.TASKS, MIX])}"
        )
    names = tuple(tasks.TASKS) if task == MIX else (task,)
    n = BUILTIN_SPLIT_ROWS[split] if n_rows is None else n_rows
    if n <= 0:
        raise DatasetError(f"n_rows ({n}) must be positive")

    def make(m: int, s: int) -> list[Row]:
        return tasks.make_mixed_examples(m, s, names, paired=paired)

    if split == "train":
        rows = make(n, seed)
    else:
        seen = {r["prompt"] for r in make(BUILTIN_SPLIT_ROWS["train"], seed)}
        rows = [r for r in make(4 * n + 64, seed + 1_000_003) if r["prompt"] not in seen][:n]
        if len(rows) < n:
            raise DatasetError(f"'{name}' has too few distinct prompts for {n} eval rows")
    return [(i + 1, r) for i, r in enumerate(rows)]
