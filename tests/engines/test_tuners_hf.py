"""Adapters trained in realflow are real HF peft adapters: the saved directory loads with
`peft.PeftModel.from_pretrained` on the transformers model and gives realflow's logits, and the
merged model (`save_merged`) loads in transformers with the same logits.

Adapter weights are set to random values first (LoRA's B starts at zero: an untouched adapter
would change nothing and hide any mistake). gpt2 covers an HF model that fuses q, k and v into
one module (`c_attn`), to which realflow's per-projection LoRA/DoRA is converted; the llama
cases cover every built-in peft method."""

from __future__ import annotations

import json

import pytest
import torch
from models_testutils import VOCAB, hf_model, make_tokenizer, random_packed

from realflow.engines import EngineConfig, OptimizerConfig, build_train_engine
from realflow.engines.config import AdapterSpec
from realflow.engines.tuners import AdapterError, apply_adapters, save_adapters
from realflow.models.adapters import AdapterExportError
from realflow.models.hf_io import init_from_actor, load_hf

LENS = [5, 9, 3]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for case in ("llama", "gpt2", "qwen2"):
        path = root / case
        hf_model(case).save_pretrained(path)
        make_tokenizer().save_pretrained(path)
        out[case] = path
    return out


def adapted_engine(path, spec: AdapterSpec, head: str = "lm", **engine_kw):
    if head == "lm":
        module = load_hf(path, dtype=torch.float32, load_tokenizer=False).model
    else:
        module = init_from_actor(path, head=head, seed=3, dtype=torch.float32).model
    apply_adapters(module, spec, seed=0, base_path=str(path))
    engine = build_train_engine(module, EngineConfig(**engine_kw), OptimizerConfig(), 10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return engine


def per_sequence(hf, ids_T, cu, field="logits"):
    """HF outputs of each packed sequence run alone, concatenated."""
    outs = []
    with torch.no_grad():
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            outs.append(getattr(hf(input_ids=ids_T[a:b][None]), field)[0])
    return torch.cat(outs)


def ours(engine, ids_T, cu):
    return engine.forward_no_grad(lambda m: m(ids_T, cu))


def peft_model(base_dir, adapter_dir, auto=None):
    import transformers
    from peft import PeftModel

    auto = auto or transformers.AutoModelForCausalLM
    kwargs = {} if auto is transformers.AutoModelForCausalLM else {"num_labels": 1}
    base = auto.from_pretrained(base_dir, **kwargs)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


CASES = [
    ("llama", AdapterSpec("lora", ("all-linear",), {"r": 4, "lora_alpha": 8})),
    ("llama", AdapterSpec("dora", ("all-linear",), {"r": 4})),
    ("llama", AdapterSpec("ia3", ("all-linear",), {})),
    ("llama", AdapterSpec("loha", ("q_proj", "v_proj"), {"r": 4})),
    ("llama", AdapterSpec("lokr", ("o_proj", "down_proj"), {"r": 4})),
    ("llama", AdapterSpec("oft", ("all-linear",), {"r": 4, "oft_block_size": 0})),
    ("llama", AdapterSpec("boft", ("q_proj", "up_proj"), {})),
    ("llama", AdapterSpec("hra", ("all-linear",), {})),
    ("qwen2", AdapterSpec("lora", ("all-linear",), {"r": 4, "bias": "all"})),
    ("gpt2", AdapterSpec("lora", ("all-linear",), {"r": 4, "lora_alpha": 8, "use_rslora": True})),
    # k_proj without an adapter: its rows of the fused B stay zero, its DoRA magnitude is the
    # norm of its base rows.
    ("gpt2", AdapterSpec("dora", ("q_proj", "v_proj", "up_proj"), {"r": 2, "bias": "lora_only"})),
    ("gpt2", AdapterSpec("ia3", ("o_proj", "up_proj", "down_proj"), {})),
]


@pytest.mark.parametrize(("case", "spec"), CASES, ids=[f"{c}-{s.method}" for c, s in CASES])
def test_saved_adapter_loads_in_peft_and_merged_model_in_transformers(
    hf_dirs, tmp_path, case, spec
):
    import transformers

    engine = adapted_engine(hf_dirs[case], spec, save_merged=True)
    save_adapters(engine, tmp_path / "adapter", make_tokenizer())
    ids_T, cu = random_packed(LENS, seed=2)
    want = ours(engine, ids_T, cu)
    base = per_sequence(transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[case]), ids_T, cu)
    assert (want - base).abs().max() > 0.05  # the adapters do change the model
    got = per_sequence(peft_model(hf_dirs[case], tmp_path / "adapter"), ids_T, cu)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    merged_dir = tmp_path / "adapter" / "merged"
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(per_sequence(merged, ids_T, cu), want, atol=2e-5, rtol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_dirs[case])
    assert config["task_type"] == "CAUSAL_LM"


def test_fused_gpt2_lora_is_one_lora_of_three_times_the_rank(hf_dirs, tmp_path):
    from safetensors.torch import load_file

    spec = AdapterSpec("lora", ("q_proj", "k_proj", "v_proj"), {"r": 2, "lora_alpha": 6})
    engine = adapted_engine(hf_dirs["gpt2"], spec)
    save_adapters(engine, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"]
    assert config["rank_pattern"] == {f"transformer.h.{i}.attn.c_attn": 6 for i in range(2)}
    assert config["alpha_pattern"] == {f"transformer.h.{i}.attn.c_attn": 18 for i in range(2)}
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = weights["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert b.shape == (3 * 64, 6)
    assert torch.count_nonzero(b[:64, 2:]) == 0 and torch.count_nonzero(b[64:128, :2]) == 0


def test_value_head_is_saved_as_modules_to_save(hf_dirs, tmp_path):
    import transformers

    spec = AdapterSpec("lora", ("all-linear",), {"r": 4})
    engine = adapted_engine(hf_dirs["llama"], spec, head="critic", save_merged=True)
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    assert "score.modules_to_save.default.weight" in trainable
    save_adapters(engine, tmp_path / "critic")
    ids_T, cu = random_packed(LENS, seed=4)
    auto = transformers.AutoModelForTokenClassification
    got = per_sequence(peft_model(hf_dirs["llama"], tmp_path / "critic", auto), ids_T, cu)
    torch.testing.assert_close(got[:, 0], ours(engine, ids_T, cu), atol=2e-5, rtol=1e-5)
    merged = auto.from_pretrained(tmp_path / "critic" / "merged").eval()
    torch.testing.assert_close(
        per_sequence(merged, ids_T, cu)[:, 0], ours(engine, ids_T, cu), atol=2e-5, rtol=1e-5
    )


def test_adapters_without_an_hf_form_fail_when_built(hf_dirs):
    module = load_hf(hf_dirs["gpt2"], dtype=torch.float32, load_tokenizer=False).model
    with pytest.raises(AdapterExportError, match="fused module transformer.h.0.attn.c_attn"):
        apply_adapters(module, AdapterSpec("ia3", ("all-linear",), {}), 0, "")


def test_unknown_target_and_peft_argument_are_clear_errors(hf_dirs):
    module = load_hf(hf_dirs["llama"], dtype=torch.float32, load_tokenizer=False).model
    with pytest.raises(AdapterError, match="'q_prj' \\(did you mean 'q_proj'\\?\\)"):
        apply_adapters(module, AdapterSpec("lora", ("q_prj",), {}), 0, "")
    with pytest.raises(AdapterError, match="LoraConfig has no field 'rank'"):
        apply_adapters(module, AdapterSpec("lora", ("q_proj",), {"rank": 4}), 0, "")
    assert VOCAB == module.config.vocab_size


def test_an_adapter_directory_given_as_a_model_path_says_what_to_give(hf_dirs, tmp_path):
    spec = AdapterSpec("lora", ("all-linear",), {"r": 4})
    save_adapters(adapted_engine(hf_dirs["llama"], spec, save_merged=True), tmp_path / "a")
    with pytest.raises(ValueError, match="is a peft adapter directory, not a model") as info:
        load_hf(tmp_path / "a", load_tokenizer=False)
    assert "base_model_name_or_path" in str(info.value) and "merged/" in str(info.value)
    with pytest.raises(ValueError, match="no config.json"):  # any other directory
        load_hf(tmp_path, load_tokenizer=False)
    assert load_hf(tmp_path / "a" / "merged", load_tokenizer=False).model is not None
