from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from realflow.data.tasks import TASKS
from realflow.data.tokenizer import (
    BUILTIN_TOKENIZER_DIR,
    TokenizerError,
    build_builtin_tokenizer,
    load_tokenizer,
    prompt_token_ids,
    text_token_ids,
    write_builtin_tokenizer,
)

ASCII = "".join(chr(c) for c in range(32, 127)) + "\n"


def test_special_tokens(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 195


@pytest.mark.parametrize(
    "text", ["rev 4 7 1 2 =", " 2 1 7 4", "add 12 + 7 = 19", "  two  spaces ", ASCII, "", "a\n b"]
)
def test_round_trip(tok, text):
    ids = text_token_ids(tok, text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(prompt_token_ids(tok, text), skip_special_tokens=True) == text


def test_space_merges_with_next_char(tok):
    assert tok.convert_ids_to_tokens(text_token_ids(tok, "rev 4 =")) == ["r", "e", "v", " 4", " ="]
    # Tokenizing prompt and answer apart gives the same ids as tokenizing them together.
    for task in TASKS.values():
        for ex in task.make_examples(20, seed=3):
            joint = text_token_ids(tok, ex["prompt"] + ex["answer"])
            assert joint == text_token_ids(tok, ex["prompt"]) + text_token_ids(tok, ex["answer"])


def test_prompt_ids_are_what_transformers_encodes(tok):
    # Exported checkpoints see in plain transformers the ids realflow trained them on.
    assert tok("rev 1 =")["input_ids"] == prompt_token_ids(tok, "rev 1 =")
    assert prompt_token_ids(tok, "rev 1 =") == [tok.bos_token_id, *text_token_ids(tok, "rev 1 =")]


def test_shipped_files_match_builder(tmp_path):
    write_builtin_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shipped = json.loads((BUILTIN_TOKENIZER_DIR / name).read_text())
        assert shipped == json.loads((tmp_path / name).read_text()), name
    built = build_builtin_tokenizer()
    assert built.get_vocab() == load_tokenizer("builtin").get_vocab()


def test_builtin_model_names_share_the_tokenizer(tok):
    assert load_tokenizer("builtin:tiny").get_vocab() == tok.get_vocab()


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "ckpt")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"), local_files_only=True)
    text = "sort 3 1 2 = 1 2 3"
    assert loaded(text, add_special_tokens=False)["input_ids"] == text_token_ids(tok, text)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    again = load_tokenizer(tmp_path / "ckpt")
    assert again.decode(text_token_ids(again, text)) == text


def test_load_local_dir_without_pad_uses_eos(tmp_path):
    write_builtin_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").unlink()
    assert load_tokenizer(tmp_path).pad_token_id == 2


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="never downloads"):
        load_tokenizer("some-org/some-model")


def test_import_realflow_data_is_cheap():
    code = "import sys, realflow.data; assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(ASCII)), max_size=40))
def test_round_trip_any_ascii(tok, text):
    assert tok.decode(text_token_ids(tok, text)) == text
