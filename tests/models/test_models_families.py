"""HF family registry: lookup, converters both ways, parameter naming, a family added by a user."""

from __future__ import annotations

import json

import pytest
import torch
from models_testutils import HF_CASES, hf_config, hf_model, random_packed

from realflow.api.registry import MODEL_FAMILIES, RegistryError
from realflow.models.families import HFFamily, family_for_hf_config, make_llama_like
from realflow.models.hf_io import load_hf, save_hf


def test_builtin_families_are_registered():
    assert {"llama", "qwen2", "gpt2"} <= set(MODEL_FAMILIES.names())
    assert isinstance(MODEL_FAMILIES.get("gpt2"), HFFamily)
    with pytest.raises(RegistryError, match="Did you mean 'llama'"):
        MODEL_FAMILIES.get("lama")


def test_family_found_from_model_type_or_architectures():
    assert family_for_hf_config({"model_type": "qwen2"}).name == "qwen2"
    assert family_for_hf_config({"architectures": ["GPT2LMHeadModel"]}).name == "gpt2"
    assert (
        family_for_hf_config({"architectures": ["LlamaForSequenceClassification"]}).head_of(
            {"architectures": ["LlamaForSequenceClassification"]}
        )
        == "reward"
    )


@pytest.mark.parametrize("case", list(HF_CASES))
def test_config_round_trip(case):
    hf = hf_config(case).to_dict()
    family = family_for_hf_config(hf)
    ours = family.config_from_hf(hf)
    again = family.config_from_hf(family.config_to_hf(ours))
    again.extra_hf = ours.extra_hf
    assert again == ours


@pytest.mark.parametrize("case", list(HF_CASES))
@pytest.mark.parametrize("head", ["lm", "critic", "reward"])
def test_state_dict_round_trip_and_param_names(case, head):
    hf = hf_model(case, kind=head)
    family = family_for_hf_config(hf.config.to_dict())
    cfg = family.config_from_hf(hf.config.to_dict())
    hf_sd = {
        k: v for k, v in hf.state_dict().items() if not k.endswith("attn.bias") or "c_attn" in k
    }
    if cfg.tie_word_embeddings:
        hf_sd.pop("lm_head.weight", None)
    ours = family.state_dict_from_hf(dict(hf_sd), cfg, head)
    back = family.state_dict_to_hf(ours, cfg, head)
    assert back.keys() == hf_sd.keys()
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
    groups = family.hf_param_names(cfg, head)
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(hf_sd)
    assert list(groups) == ["embedding", "block.0", "block.1", "head"]
    assert family.block_names(cfg, 1, head) == groups["block.1"]


def test_a_family_registered_from_a_test_file_works(hf_dirs, tmp_path):
    """A new family: one HFFamily (here a renamed copy of llama) and one register call."""
    family = make_llama_like("my-llama", "my_llama", "MyLlama", qwen=False)
    MODEL_FAMILIES.register("my-llama", family)
    try:
        src = tmp_path / "src"
        src.mkdir()
        cfg = json.loads((hf_dirs["llama"] / "config.json").read_text())
        cfg.update(model_type="my_llama", architectures=["MyLlamaForCausalLM"])
        (src / "config.json").write_text(json.dumps(cfg))
        (src / "model.safetensors").symlink_to(hf_dirs["llama"] / "model.safetensors")
        model, _ = load_hf(src)
        assert model.config.family == "my-llama"
        ref, _ = load_hf(hf_dirs["llama"])
        ids, cu = random_packed([4, 6], seed=21)
        with torch.no_grad():
            assert torch.equal(model(ids, cu), ref(ids, cu))
        out = save_hf(model, tmp_path / "saved")
        saved = json.loads((out / "config.json").read_text())
        assert saved["model_type"] == "my_llama" and saved["architectures"] == [
            "MyLlamaForCausalLM"
        ]
        assert load_hf(out)[0].config.family == "my-llama"
    finally:
        MODEL_FAMILIES.unregister("my-llama")
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_hf(tmp_path / "saved")
