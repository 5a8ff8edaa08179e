"""Datasets, tokenizers, the batch loader and the built-in tiny tasks.

Importing this package is cheap: names load on first use.

    from realflow.data import DataLoader, load_tokenizer, PromptDataset
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataLoader": "realflow.data.loader",
    "DatasetError": "realflow.data.sources",
    "PairedDataset": "realflow.data.datasets",
    "PromptAnswerDataset": "realflow.data.datasets",
    "PromptDataset": "realflow.data.datasets",
    "TASKS": "realflow.data.tasks",
    "Task": "realflow.data.tasks",
    "TokenizerError": "realflow.data.tokenizer",
    "get_task": "realflow.data.tasks",
    "load_tokenizer": "realflow.data.tokenizer",
    "prompt_token_ids": "realflow.data.tokenizer",
    "text_token_ids": "realflow.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'realflow.data' has no attribute '{name}'")
