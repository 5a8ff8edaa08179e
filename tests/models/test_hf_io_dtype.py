"""dtype handling of HF directories: the dtype a checkpoint loads in, and saving weights given
apart from the module (a train engine's fp32 masters, or gathered ZeRO-3 weights)."""

from __future__ import annotations

import json

import pytest
import torch
from models_testutils import hf_model

from realflow.models.hf_io import load_hf, read_hf_state_dict, save_hf


def test_unrecorded_dtype_is_that_of_the_tensors(tmp_path):
    hf_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_hf(tmp_path, load_tokenizer=False).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert load_hf(tmp_path, dtype="float32", load_tokenizer=False).model.lm_head.weight.dtype == (
        torch.float32
    )


def test_save_given_weights_in_a_given_dtype(tmp_path):
    model = load_hf_tiny(tmp_path)
    masters = {k: v.detach().float() + 1e-3 for k, v in model.state_dict().items()}
    save_hf(model, tmp_path / "out", dtype=torch.bfloat16, state_dict=masters)
    saved = load_hf(tmp_path / "out", load_tokenizer=False).model.state_dict()
    for k, v in masters.items():
        assert saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], v.to(torch.bfloat16)), k


def test_partitioned_weights_are_refused(tmp_path):
    """ZeRO-3 leaves parameters of shape (0,) on the module: never write those."""
    model = load_hf_tiny(tmp_path)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sd["embed_tokens.weight"] = torch.empty(0)
    with pytest.raises(ValueError, match=r"embed_tokens.weight has shape \(0,\).*ZeRO-3"):
        save_hf(model, tmp_path / "out", state_dict=sd)
    assert not (tmp_path / "out").exists()
    del sd["embed_tokens.weight"]
    with pytest.raises(ValueError, match="missing"):
        save_hf(model, tmp_path / "out", state_dict=sd)


def load_hf_tiny(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "hf")
    assert read_hf_state_dict(tmp_path / "hf")
    return load_hf(tmp_path / "hf", load_tokenizer=False).model
