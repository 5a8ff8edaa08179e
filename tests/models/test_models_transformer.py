"""Packed transformer vs transformers' padded forward, attention backends, run options."""

from __future__ import annotations

import pytest
import torch
from models_testutils import HF_CASES, hf_model, pad_batch, random_packed, unpad

from realflow.models.attention import ATTN_BACKENDS, resolve_attn_impl
from realflow.models.builtin import builtin_config, builtin_names
from realflow.models.config import TransformerConfig
from realflow.models.hf_io import load_hf
from realflow.models.transformer import PackedTransformer

LENS = [7, 1, 13, 4, 13, 30]


@pytest.mark.parametrize("case", list(HF_CASES))
def test_packed_logits_equal_hf_padded(case, hf_dirs):
    model, _ = load_hf(hf_dirs[case], load_tokenizer=False)
    hf = hf_model(case)
    ids, cu = random_packed(LENS, seed=1)
    padded, mask = pad_batch(ids, cu)
    with torch.no_grad():
        ours = model(ids, cu)
        ref = unpad(hf(input_ids=padded, attention_mask=mask).logits, cu)
    assert ours.shape == (sum(LENS), hf.config.vocab_size)
    assert (ours - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("impl", list(ATTN_BACKENDS))
def test_attention_backends_agree(impl):
    if impl in ("flash", "torch_varlen"):
        pytest.skip(f"{impl} needs CUDA (tests/models/test_models_cuda.py)")
    cfg = builtin_config("tiny-llama", vocab_size=50)
    torch.manual_seed(0)
    ref_model = PackedTransformer(cfg.replace(attn_impl="sdpa_blockmask"))
    model = PackedTransformer(cfg.replace(attn_impl=impl))
    model.load_state_dict(ref_model.state_dict())
    ids, cu = random_packed([5, 5, 9, 1, 5], seed=2, low=0)
    ids = ids % 50
    with torch.no_grad():
        assert torch.allclose(model(ids, cu), ref_model(ids, cu), atol=1e-5)


def test_attn_impl_resolution():
    cpu = torch.device("cpu")
    assert resolve_attn_impl("auto", cpu) in ATTN_BACKENDS
    assert resolve_attn_impl("sdpa_grouped", cpu) == "sdpa_grouped"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_attn_impl("flash", cpu)
    with pytest.raises(ValueError, match="invalid TransformerConfig"):
        builtin_config("tiny-llama", vocab_size=10, attn_impl="nope")


def test_sequences_do_not_interact():
    """A sequence's outputs do not depend on its neighbours in the pack."""
    torch.manual_seed(0)
    model = PackedTransformer(builtin_config("tiny-qwen2", vocab_size=40))
    a, cu_a = random_packed([6], seed=3, low=0)
    b, _ = random_packed([9, 4], seed=4, low=0)
    a, b = a % 40, b % 40
    with torch.no_grad():
        alone = model(a, cu_a)
        packed = model(
            torch.cat([b[:9], a, b[9:]]), torch.tensor([0, 9, 15, 19], dtype=torch.int32)
        )
    assert torch.allclose(packed[9:15], alone, atol=1e-5)


@pytest.mark.parametrize("head", ["critic", "reward"])
def test_value_and_score_heads_shapes(head):
    model = PackedTransformer(builtin_config("tiny-gpt2", vocab_size=30), head=head)
    ids, cu = random_packed([3, 8, 2], low=0)
    out = model(ids % 30, cu)
    assert out.shape == ((13,) if head == "critic" else (3,))
    if head == "reward":  # the score is the critic-style value at each last token
        values = model.score(model.hidden_states(ids % 30, _seqs(cu))).squeeze(-1)
        assert torch.allclose(out, values[cu[1:].long() - 1], atol=1e-6)


def _seqs(cu):
    from realflow.models.attention import PackedSeqs

    return PackedSeqs.from_cu_seqlens(cu)


def test_gradient_checkpointing_same_grads():
    cfg = builtin_config("tiny-llama", vocab_size=40)
    torch.manual_seed(0)
    plain = PackedTransformer(cfg).train()
    ckpt = PackedTransformer(cfg.replace(gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    ids, cu = random_packed([5, 11], low=0)
    ids = ids % 40
    for m in (plain, ckpt):
        m(ids, cu).logsumexp(-1).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_bf16_autocast_close_to_fp32():
    cfg = builtin_config("tiny-llama", vocab_size=40)
    torch.manual_seed(0)
    fp32 = PackedTransformer(cfg)
    bf16 = PackedTransformer(cfg.replace(autocast_dtype="bfloat16"))
    bf16.load_state_dict(fp32.state_dict())
    ids, cu = random_packed([5, 11], low=0)
    with torch.no_grad():
        out = bf16(ids % 40, cu)
        ref = fp32(ids % 40, cu)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05


def test_parameter_groups_cover_all_parameters():
    cfg = builtin_config("tiny-qwen2", vocab_size=40)  # tied embeddings
    model = PackedTransformer(cfg)
    groups = model.parameter_groups()
    assert list(groups) == ["embedding", "block.0", "block.1", "head"]
    named = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert set().union(*groups.values()) == named
    assert "lm_head.weight" in groups["head"] and "norm.weight" in groups["head"]
    assert (
        model.head_parameters()["lm_head.weight"]
        is model.embedding_parameters()["embed_tokens.weight"]
    )
    assert all(n.startswith("layers.1.") for n in model.block_parameters(1))


def test_bad_inputs_raise_clear_errors():
    model = PackedTransformer(builtin_config("tiny-gpt2", vocab_size=30))
    ids, cu = random_packed([3, 4], low=0)
    with pytest.raises(ValueError, match="1-D"):
        model(ids[None] % 30, cu)
    with pytest.raises(ValueError, match="end at len"):
        model(ids[:5] % 30, cu)
    with pytest.raises(ValueError, match="at least one token"):
        model(ids % 30, torch.tensor([0, 0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="head"):
        PackedTransformer(builtin_config("tiny-gpt2", vocab_size=30), head="value")


def test_config_validation_reports_every_error():
    with pytest.raises(ValueError) as err:
        TransformerConfig(
            vocab_size=0,
            hidden_size=64,
            n_layers=2,
            n_heads=4,
            intermediate_size=8,
            n_kv_heads=3,
            norm_type="x",
        )
    msg = str(err.value)
    assert "vocab_size" in msg and "n_kv_heads" in msg and "norm_type" in msg


def test_builtin_configs_build():
    for name in builtin_names():
        cfg = builtin_config(name, vocab_size=64)
        assert cfg.vocab_size == 64
    with pytest.raises(ValueError, match="Did you mean 'tiny-llama'"):
        builtin_config("tiny-lama", vocab_size=10)
