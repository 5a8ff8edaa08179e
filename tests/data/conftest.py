from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from realflow.data.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tok():
    """The built-in tokenizer (loaded once; tests must not change it)."""
    return load_tokenizer("builtin")


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[[list[Any], str], str]:
    """Write rows (dicts, or raw strings written as-is) to a JSONL file; returns its path."""

    def write(rows: list[Any], name: str = "data.jsonl") -> str:
        path = tmp_path / name
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    return write
