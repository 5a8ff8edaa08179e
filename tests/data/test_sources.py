"""Reading JSONL files: encodings and paths that are not a file (issue 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from realflow.data.datasets import PromptAnswerDataset
from realflow.data.sources import DatasetError

GOOD = {"prompt": "a", "answer": " b"}


def _write_bytes(tmp_path: Path, lines: list[bytes]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_non_utf8_row_names_file_line_and_byte(tok, tmp_path):
    latin1 = json.dumps({"prompt": "caf\u00e9", "answer": " b"}, ensure_ascii=False)
    path = _write_bytes(tmp_path, [json.dumps(GOOD).encode(), latin1.encode("latin-1")])
    with pytest.raises(DatasetError) as info:
        PromptAnswerDataset(path, tok)
    # column: 1-based character position of the bad byte, as for invalid JSON
    column = latin1.index("\u00e9") + 1
    assert str(info.value) == (
        f"{path}:2: not valid UTF-8: byte 0xe9 at column {column}; save the file as UTF-8"
    )


def test_skip_bad_rows_skips_non_utf8_rows(tok, tmp_path):
    lines = [
        json.dumps(GOOD).encode(),
        json.dumps({"prompt": "\u00fcber", "answer": " x"}, ensure_ascii=False).encode("latin-1"),
        json.dumps({"prompt": "c", "answer": " d"}).encode(),
        b"\xff\xfe",  # a UTF-16 byte order mark on its own line
    ]
    ds = PromptAnswerDataset(_write_bytes(tmp_path, lines), tok, skip_bad_rows=True)
    assert [ds[i].metadata["prompt"] for i in range(len(ds))] == [["a"], ["c"]]
    assert ds.n_bad == 2
    assert [m.split(": ", 1)[0].rsplit(":", 1)[1] for m in ds.bad_rows] == ["2", "4"]
    assert all("not valid UTF-8" in m for m in ds.bad_rows)


def test_utf8_bom_at_file_start_is_accepted(tok, tmp_path):
    rows = [{"prompt": "\u00e9t\u00e9", "answer": " b"}, {"prompt": "c", "answer": " d"}]
    plain = _write_bytes(tmp_path, [json.dumps(r, ensure_ascii=False).encode() for r in rows])
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + Path(plain).read_bytes())
    with_bom, without = PromptAnswerDataset(str(bom), tok), PromptAnswerDataset(plain, tok)
    assert len(with_bom) == len(without) == 2
    for i in range(2):
        assert with_bom[i].metadata == without[i].metadata
        assert with_bom[i].data["packed_input_ids"].tolist() == (
            without[i].data["packed_input_ids"].tolist()
        )


def test_bom_after_the_first_line_is_still_an_error(tok, tmp_path):
    path = _write_bytes(tmp_path, [json.dumps(GOOD).encode(), b"\xef\xbb\xbf" + b'{"prompt": "x"}'])
    with pytest.raises(DatasetError, match=r":2: invalid JSON"):
        PromptAnswerDataset(path, tok)


def test_directory_as_dataset_path(tok, tmp_path):
    with pytest.raises(DatasetError) as info:
        PromptAnswerDataset(str(tmp_path), tok)
    assert str(info.value) == f"dataset path '{tmp_path}' is a directory; give a JSONL file"
