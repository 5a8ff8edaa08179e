"""A corrupt or incomplete HF directory gives an error that names the file and what to do."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from models_testutils import hf_model

from realflow.models.hf_io import load_hf, read_hf_config, read_hf_state_dict

REDOWNLOAD = "copy or download the checkpoint again"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One tiny llama saved three ways: single safetensors, sharded safetensors, .bin."""
    root = tmp_path_factory.mktemp("saved")
    hf = hf_model("llama")
    hf.save_pretrained(root / "single")
    hf.save_pretrained(root / "sharded", max_shard_size="100KB")
    (root / "bin").mkdir()
    torch.save(hf.state_dict(), root / "bin" / "pytorch_model.bin")
    hf.config.save_pretrained(root / "bin")
    return {p.name: p for p in root.iterdir()}


def _truncate(file: Path) -> Path:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return file


def _second_shard(d: Path) -> Path:
    return sorted(d.glob("model-*.safetensors"))[1]


def _garbage(file: Path) -> Path:
    file.write_bytes(b"not weights" * 50)
    return file


def _delete(file: Path) -> Path:
    file.unlink()
    return file


def _cut_index(d: Path) -> Path:
    file = d / "model.safetensors.index.json"
    file.write_text('{"weight_map": {')
    return file


# case -> (layout, damage(dir) -> the file the error must name, words the error must contain)
CASES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "truncated_safetensors": (
        "single",
        lambda d: _truncate(d / "model.safetensors"),
        "is not a readable safetensors file",
    ),
    "garbage_safetensors": (
        "single",
        lambda d: _garbage(d / "model.safetensors"),
        "is not a readable safetensors file",
    ),
    "truncated_shard": (
        "sharded",
        lambda d: _truncate(_second_shard(d)),
        "is not a readable safetensors file",
    ),
    "missing_shard": ("sharded", lambda d: _delete(_second_shard(d)), "is missing"),
    "corrupt_index": ("sharded", _cut_index, "is not valid JSON"),
    "truncated_bin": ("bin", lambda d: _truncate(d / "pytorch_model.bin"), "cannot be read"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_weights_name_the_file(saved, tmp_path, case):
    layout, damage, message = CASES[case]
    d = tmp_path / layout
    shutil.copytree(saved[layout], d)
    load_hf(d, load_tokenizer=False)  # the undamaged copy loads
    bad_file = damage(d)
    for read in (read_hf_state_dict, lambda p: load_hf(p, load_tokenizer=False)):
        with pytest.raises(ValueError) as info:
            read(d)
        text = str(info.value)
        assert str(bad_file) in text and message in text and REDOWNLOAD in text, text


@pytest.mark.parametrize("content", ['{"model_type": "llama",', "", "[1, 2]"])
def test_corrupt_config_json_names_the_file(saved, tmp_path, content):
    d = tmp_path / "single"
    shutil.copytree(saved["single"], d)
    (d / "config.json").write_text(content)
    for read in (read_hf_config, lambda p: load_hf(p, load_tokenizer=False)):
        with pytest.raises(ValueError) as info:
            read(d)
        text = str(info.value)
        assert text.startswith(f"{d / 'config.json'}: ") and REDOWNLOAD in text, text
