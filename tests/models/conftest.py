"""Fixtures for model tests (helpers live in models_testutils.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from models_testutils import HF_CASES, hf_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """case -> directory of a saved random-init HF causal LM (with a tiny tokenizer)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    tok = make_tokenizer()
    for case in HF_CASES:
        path = root / case
        hf_model(case).save_pretrained(path)
        tok.save_pretrained(path)
        out[case] = path
    return out
