"""Loading from and saving to HF directories, checked by loading them back in transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from models_testutils import (
    HF_CASES,
    PAD,
    hf_model,
    make_tokenizer,
    pad_batch,
    random_packed,
    unpad,
)

from realflow.models.builtin import builtin_config
from realflow.models.hf_io import init_from_actor, load_hf, read_hf_config, save_hf
from realflow.models.transformer import PackedTransformer

LENS = [5, 12, 1, 8]


def _hf_logits(hf, ids, cu):
    padded, mask = pad_batch(ids, cu)
    with torch.no_grad():
        return unpad(hf(input_ids=padded, attention_mask=mask).logits, cu)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_save_then_transformers_load_equal_logits(case, hf_dirs, tmp_path):
    model, tok = load_hf(hf_dirs[case])
    assert tok is not None and tok.pad_token_id == PAD
    out = save_hf(model, tmp_path / "ckpt", tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left over
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, cu = random_packed(LENS, seed=5)
    with torch.no_grad():
        ours = model(ids, cu)
    assert (_hf_logits(hf, ids, cu) - ours).abs().max() <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
    # And back again: the saved directory loads in realflow with identical weights.
    again, _ = load_hf(out)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())
    )


@pytest.mark.parametrize("case", ["llama", "gpt2"])
@pytest.mark.parametrize("head", ["critic", "reward"])
def test_value_and_score_heads_round_trip_through_hf(case, head, tmp_path):
    hf_kind = hf_model(case, kind=head, seed=3)
    hf_kind.save_pretrained(tmp_path / "hf")
    model, _ = load_hf(tmp_path / "hf", head=head)
    ids, cu = random_packed(LENS, seed=6)
    padded, mask = pad_batch(ids, cu)
    with torch.no_grad():
        ours = model(ids, cu)
        ref = hf_kind(input_ids=padded, attention_mask=mask).logits.squeeze(-1)
    ref = unpad(ref, cu) if head == "critic" else ref
    assert (ours - ref).abs().max() <= 1e-4

    save_hf(model, tmp_path / "ours")
    cfg = read_hf_config(tmp_path / "ours")
    suffix = "ForTokenClassification" if head == "critic" else "ForSequenceClassification"
    assert cfg["architectures"][0].endswith(suffix) and cfg["id2label"] == {"0": "LABEL_0"}
    auto = (
        transformers.AutoModelForTokenClassification
        if head == "critic"
        else transformers.AutoModelForSequenceClassification
    )
    reloaded = auto.from_pretrained(tmp_path / "ours").eval()
    assert reloaded.config.num_labels == 1
    with torch.no_grad():
        ref2 = reloaded(input_ids=padded, attention_mask=mask).logits.squeeze(-1)
    ref2 = unpad(ref2, cu) if head == "critic" else ref2
    assert (ours - ref2).abs().max() <= 1e-4


def test_init_from_actor_is_deterministic_and_keeps_the_body(hf_dirs):
    actor, _ = load_hf(hf_dirs["qwen2"], load_tokenizer=False)
    a, _ = init_from_actor(hf_dirs["qwen2"], head="critic", seed=7, load_tokenizer=False)
    b, _ = init_from_actor(hf_dirs["qwen2"], head="critic", seed=7, load_tokenizer=False)
    c, _ = init_from_actor(hf_dirs["qwen2"], head="reward", seed=8, load_tokenizer=False)
    assert torch.equal(a.score.weight, b.score.weight) and torch.equal(a.score.bias, torch.zeros(1))
    assert not torch.equal(a.score.weight[:, :10], c.score.weight[:, :10])
    assert torch.equal(a.layers[1].mlp.up_proj.weight, actor.layers[1].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="init_from_actor"):
        load_hf(hf_dirs["qwen2"], head="critic")


def test_sharded_safetensors_and_bin_load(hf_dirs, tmp_path):
    ref, _ = load_hf(hf_dirs["llama"], load_tokenizer=False)
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "bin").mkdir()
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "bin" / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path / "bin")
    save_hf(ref, tmp_path / "ours_sharded", max_shard_bytes=50_000)
    assert len(list((tmp_path / "ours_sharded").glob("model-*.safetensors"))) > 1
    ids, cu = random_packed(LENS, seed=7)
    with torch.no_grad():
        want = ref(ids, cu)
        for d in ("sharded", "bin", "ours_sharded"):
            model, _ = load_hf(tmp_path / d, load_tokenizer=False)
            assert torch.equal(model(ids, cu), want), d


def test_dtype_and_run_options_on_load(hf_dirs, tmp_path):
    model, _ = load_hf(
        hf_dirs["gpt2"], dtype="bfloat16", attn_impl="sdpa_grouped", load_tokenizer=False
    )
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.config.attn_impl == "sdpa_grouped"
    save_hf(model, tmp_path / "bf16")
    assert read_hf_config(tmp_path / "bf16")["dtype"] == "bfloat16"
    assert load_hf(tmp_path / "bf16")[0].embed_tokens.weight.dtype == torch.bfloat16


def test_builtin_model_saves_for_transformers(tmp_path):
    torch.manual_seed(0)
    model = PackedTransformer(builtin_config("tiny-llama", vocab_size=64, eos_token_id=2))
    save_hf(model, tmp_path / "m", tokenizer=make_tokenizer())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids, cu = random_packed([4, 9], seed=8)
    ids = ids % 64
    with torch.no_grad():
        assert (_hf_logits(hf, ids, cu) - model(ids, cu)).abs().max() <= 1e-4


def test_save_is_atomic_and_validates_before_writing(tmp_path):
    model = PackedTransformer(builtin_config("tiny-gpt2", vocab_size=32))
    with pytest.raises(TypeError, match="tokenizer"):
        save_hf(model, tmp_path / "a", tokenizer=object())
    with pytest.raises(TypeError, match="PackedTransformer"):
        save_hf(torch.nn.Linear(2, 2), tmp_path / "a")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an HF checkpoint"):
        save_hf(model, tmp_path / "notes")

    class Exploding:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(model, tmp_path / "a", tokenizer=Exploding())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    # Overwriting an existing checkpoint replaces it whole.
    save_hf(model, tmp_path / "a")
    model2 = PackedTransformer(builtin_config("tiny-gpt2", vocab_size=32))
    save_hf(model2, tmp_path / "a")
    assert torch.equal(load_hf(tmp_path / "a")[0].embed_tokens.weight, model2.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "notes"]


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]})
    )
    with pytest.raises(ValueError, match="unsupported architecture.*llama.*qwen2") as err:
        load_hf(tmp_path)
    assert "gpt2" in str(err.value)
    with pytest.raises(ValueError, match="config.json"):
        load_hf(tmp_path / "missing")


def test_unsupported_rope_type_is_an_error(tmp_path):
    cfg = {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="yarn"):
        load_hf(tmp_path)
