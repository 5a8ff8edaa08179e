import os

import pytest

# Nothing in these tests may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from realflow.data import load_tokenizer

    return load_tokenizer("builtin")
