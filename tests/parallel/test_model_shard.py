"""Building shards in one process: the trivial spec is the plain model, shard shapes follow the
partition, FlatParams keeps the Parameters while moving their storage, and misuse is refused."""

import pytest
import torch
from parallel_testutils import packed_batch, reference_model, tiny_config

from realflow.models.generation import GenerationConfig, generate
from realflow.models.transformer import PackedTransformer
from realflow.parallel.flat import FlatParams
from realflow.parallel.model import load_full_state_dict, shard_state_dict
from realflow.parallel.partition import ShardSpec

CONFIG = tiny_config("gpt2")


def test_a_trivial_spec_builds_the_plain_model():
    plain = reference_model(CONFIG)
    torch.manual_seed(0)
    same = PackedTransformer(CONFIG, "lm", ShardSpec())
    assert same.shard is None
    assert [(n, p.shape) for n, p in same.named_parameters()] == [
        (n, p.shape) for n, p in plain.named_parameters()
    ]
    ids, cu = packed_batch([4, 7], seed=0)
    assert torch.equal(same(ids, cu), plain(ids, cu))


def test_a_pipeline_stage_holds_its_blocks_under_their_global_names():
    last = PackedTransformer(CONFIG, "lm", ShardSpec(pp_stage=1, pp_size=2), init_weights=False)
    names = [n for n, _ in last.named_parameters()]
    assert any(n.startswith("layers.1.") for n in names)
    assert not any(n.startswith(("layers.0.", "embed_")) for n in names)
    assert "lm_head.weight" in names  # its own copy of the tied embedding
    assert last.kv_cache_dims() == (1, CONFIG.n_kv_heads, CONFIG.head_dim)


def test_flat_params_move_storage_and_keep_the_parameters():
    model = reference_model(CONFIG)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = list(model.parameters())
    flat = FlatParams(model)
    assert [p for p in model.parameters()] == params  # same objects (an optimizer stays valid)
    assert all(
        p.untyped_storage().data_ptr() == flat.buffer.untyped_storage().data_ptr() for p in params
    )
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    flat.release()
    assert flat.released and all(p.numel() == 0 for p in params)
    flat.allocate()
    load_full_state_dict(model, before)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.shape == before[n].shape


def test_misuse_is_refused_with_the_reason():
    shard = PackedTransformer(CONFIG, "lm", ShardSpec(tp_size=2), init_weights=False)
    ids, cu = packed_batch([3], seed=0)
    with pytest.raises(ValueError, match="parallel_generate"):
        generate(shard, ids, cu, GenerationConfig(max_new_tokens=2))
    sd = reference_model(CONFIG).state_dict()
    with pytest.raises(ValueError, match="state dict has no 'layers.0.mlp.up_proj.weight'"):
        shard_state_dict(shard, {k: v for k, v in sd.items() if "layers.0.mlp.up" not in k})
    sd["norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"norm.weight: shape \(3,\), the model needs \(64,\)"):
        shard_state_dict(shard, sd)
    with pytest.raises(ValueError, match=r"tp \(3\) must divide n_heads \(4\)"):
        PackedTransformer(CONFIG, "lm", ShardSpec(tp_size=3))
