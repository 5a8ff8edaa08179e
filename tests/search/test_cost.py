"""The cost model against values computed by hand from its stated formulas (docs/search.md)."""

from __future__ import annotations

import math

import pytest

from realflow.parallel.layout import Layout
from realflow.search import cost
from realflow.search.spec import DeviceProfile, Link, ModelSpec, model_spec

# 2 blocks, hidden 4, 2 heads of 2, MLP 8, vocab 10: small enough to count by hand.
TOY = ModelSpec("toy", n_layers=2, hidden_size=4, n_heads=2, n_kv_heads=2,
                intermediate_size=8, vocab_size=10)  # fmt: skip
DEV = DeviceProfile(
    name="round", source="test", peak_flops=1000.0, mem_bandwidth=100.0, memory=1e6,
    param_bytes=2, train_eff=0.5, infer_eff=0.5, decode_bw_eff=0.5, call_s=1.0,
    decode_step_s=0.1, layer_s=0.0,
)  # fmt: skip
NET = Link("net", bandwidth=10.0, latency=0.01)
LINKS = cost.Links(NET, NET, NET)


def test_parameter_count_by_hand():
    # block: q,o 4x4 each + k,v 4x4 each = 64; gated MLP 3*4*8 = 96; two norms 8 -> 168
    assert TOY.layer_params == 168
    # 2 blocks + embedding 40 + head 40 + final norm 4
    assert TOY.params == 2 * 168 + 40 + 40 + 4
    # llama-7b's published count: 6.74e9 weights
    assert model_spec("llama-7b").params == pytest.approx(6.74e9, rel=0.01)
    assert model_spec("llama-70b").params == pytest.approx(68.98e9, rel=0.01)


def test_forward_flops_by_hand():
    # matmul weights: 2 blocks * (168 - 8 norm weights) + head 40 = 360 -> 720 FLOPs;
    # attention: 4 * layers 2 * heads 2 * head_dim 2 * ctx
    assert TOY.fwd_flops_per_token(ctx=5) == 720 + 32 * 5
    assert TOY.fwd_flops_per_token(ctx=0, head=False) == 2 * 320


def test_collectives_by_hand():
    assert cost.allreduce_time(100.0, 4, NET) == pytest.approx(2 * 3 / 4 * 10 + 6 * 0.01)
    assert cost.allreduce_time(100.0, 4, NET, messages=3) == pytest.approx(15 + 18 * 0.01)
    assert cost.allreduce_time(100.0, 1, NET) == 0.0
    assert cost.p2p_time(50.0, NET) == pytest.approx(5.01)


def test_inference_time_by_hand():
    # 4 seqs of 3 + 1 tokens on dp=2: 2 seqs = 8 tokens per replica, one micro-batch.
    work = cost.Work("inference", n_seqs=4, prompt_len=3, gen_len=1, max_tokens_per_mb=100)
    flops = 8 * (720 + 32 * 2)  # ctx = seq_len / 2 = 2
    expected = 1.0 + flops / (1000 * 0.5)
    assert cost.inference_time(TOY, Layout(2, 1, 1), work, DEV, LINKS) == pytest.approx(expected)
    # tp=2: half the compute, plus 2 all-reduces per block of 8 tokens * 4 hidden * 2 bytes
    ar = 2 * 1 / 2 * 64 / 10 + 2 * 0.01
    expected_tp = 1.0 + flops / (2 * 1000 * 0.5) + 2 * 2 * ar
    assert cost.inference_time(TOY, Layout(2, 2, 1), work, DEV, LINKS) == pytest.approx(expected_tp)


def test_pipeline_bubble_and_microbatches_by_hand():
    # pp=2 on 8 seqs of 4 tokens: at least 2 * pp = 4 micro-batches -> bubble (4 + 1) / 4;
    # each boundary sends (4 + 1) forward messages of 32 tokens * 4 hidden * 2 bytes / 4 mbs.
    work = cost.Work("inference", n_seqs=8, prompt_len=4, gen_len=0, max_tokens_per_mb=1000)
    layout = Layout(1, 1, 2)
    assert cost.n_microbatches(work, layout) == 4
    flops = 32 * (720 + 32 * 2)
    per_stage = flops / (2 * 1000 * 0.5)
    pp_comm = 5 * (256 / 4 / 10 + 0.01)
    assert cost.inference_time(TOY, layout, work, DEV, LINKS) == pytest.approx(
        1.0 + per_stage * 5 / 4 + pp_comm
    )


def test_train_time_by_hand():
    # one replica of 2 seqs x 4 tokens, 3 passes, 2 optimizer steps; dp=2 all-reduces fp32 grads
    work = cost.Work("train_step", n_seqs=4, prompt_len=2, gen_len=2, n_minibatches=2)
    flops = 3 * 8 * (720 + 32 * 2)
    p_dev = 2 * 168 + 2 * 40  # blocks, embedding, head (norms of 4 weights left out)
    sync = 2 * 1 / 2 * p_dev * 4.0 / 10 + 2 * 0.01
    optim = p_dev * 28.0 / 100.0
    expected = 1.0 + flops / (1000 * 0.5) + 2 * (sync + optim)
    assert cost.train_time(TOY, Layout(2, 1, 1), work, DEV, LINKS) == pytest.approx(expected)


def test_train_pipeline_fills_and_drains_once_per_minibatch():
    """Each minibatch is its own `engine.train_batch` (an optimizer step), so the 1F1B pipeline
    drains before the next: 2 minibatches of 4 seqs x 4 tokens, a 4-token budget -> 4
    micro-batches each, bubble (4 + 1) / 4 twice (not 8 micro-batches and (8 + 1) / 8 once)."""
    work = cost.Work("train_step", n_seqs=8, prompt_len=2, gen_len=2, max_tokens_per_mb=4,
                     n_minibatches=2)  # fmt: skip
    layout = Layout(1, 1, 2)
    per_stage = 3 * 16 * (720 + 32 * 2) / (2 * 1000 * 0.5)  # one minibatch's FLOPs / 2 stages
    # forward and backward sends per boundary: (4 + 1) each, of 16 tokens * 4 hidden * 2 / 4
    pp_comm = 5 * 2 * (32 / 10 + 0.01)
    optim = (168 + 40) * 28.0 / 100.0  # stage 0: one block + embedding
    expected = 1.0 + 2 * (per_stage * 5 / 4 + pp_comm + optim)
    assert cost.train_time(TOY, layout, work, DEV, LINKS) == pytest.approx(expected)


def test_train_tensor_parallel_all_reduces_by_hand():
    """Megatron tp (realflow.parallel.tp): 2 all-reduces per block forward and 2 backward; a
    recomputed forward (gradient checkpointing) adds 2. One replica of 2 seqs x 4 tokens."""
    ar = 2 * 1 / 2 * (8 * 4 * 2) / 10 + 2 * 0.01  # 8 tokens x hidden 4 x 2 bytes over tp=2
    optim = 208 * 28.0 / 100.0
    for ckpt, passes, n_ar in ((False, 3, 4), (True, 4, 6)):
        work = cost.Work("train_step", n_seqs=2, prompt_len=2, gen_len=2,
                         gradient_checkpointing=ckpt)  # fmt: skip
        compute = passes * 8 * (720 + 32 * 2) / (2 * 1000 * 0.5)
        expected = 1.0 + compute + 2 * n_ar * ar + optim
        got = cost.train_time(TOY, Layout(1, 2, 1), work, DEV, LINKS)
        assert got == pytest.approx(expected), ckpt


def test_generate_time_by_hand():
    # 2 seqs on one device: prefill of 2 x 3 prompt tokens, then 2 decode steps at ctx 3 + 1.
    work = cost.Work("generate", n_seqs=2, prompt_len=3, gen_len=2)
    prefill = 6 * (720 + 32 * 1.5) / (1000 * 0.5)
    ctx = 4.0
    compute = 2 * (720 + 32 * ctx) / (1000 * 0.5)
    kv = 2 * ctx * 2 * 2 * 2 * 2 * 2  # b * ctx * (k, v) * layers * kv heads * head_dim * bytes
    memory = (TOY.params * 2 + kv) / (100 * 0.5)
    step = max(compute, memory) + 0.1
    expected = 1.0 + prefill + 2 * step
    assert cost.generate_time(TOY, Layout(1, 1, 1), work, DEV, LINKS) == pytest.approx(expected)


def test_pipeline_does_not_speed_up_a_decode_step():
    """realflow decodes stage after stage: pp spreads the weights, the step reads them all."""
    kw = dict(b=4, ctx=8.0, dev=DEV, links=LINKS)
    one = cost.decode_step_time(TOY, Layout(1, 1, 1), **kw)
    two = cost.decode_step_time(TOY, Layout(1, 1, 2), **kw)
    assert two == pytest.approx(one + cost.p2p_time(4 * 4 * 2, NET))


def test_memory_by_hand():
    # d1t2p1: blocks 2 * 168 / 2 + embedding and head 2 * 40 / 2 = 208 weights per device
    assert cost.device_params(TOY, Layout(1, 2, 1)) == 208
    assert cost.weights_bytes(TOY, Layout(1, 2, 1), DEV, trained=True) == 208 * 16
    assert cost.weights_bytes(TOY, Layout(1, 2, 1), DEV, trained=False) == 208 * 2
    # pp=2: one block + one vocab matrix on the fuller stage
    assert cost.device_params(TOY, Layout(1, 1, 2)) == 168 + 40
    # generate: KV cache of 3 seqs x 5 tokens x (k, v) x 2 layers x 2 heads x 2 dims x 2 bytes,
    # plus one step's fp32 logits twice
    gen = cost.Work("generate", n_seqs=3, prompt_len=3, gen_len=2)
    assert cost.activation_bytes(TOY, Layout(1, 1, 1), gen, DEV) == 3 * 5 * 2 * 2 * 2 * 2 * 2 + (
        3 * 10 * 4 * 2
    )
    # train: 1 micro-batch of 8 tokens, 34 * hidden bytes per token per layer, logits 3x fp32
    tr = cost.Work("train_step", n_seqs=2, prompt_len=2, gen_len=2)
    assert cost.activation_bytes(TOY, Layout(1, 1, 1), tr, DEV) == 8 * 2 * 34 * 4 + 8 * 40 * 3


def test_tensor_parallel_splits_only_part_of_the_stored_activations():
    """Without sequence parallelism (realflow has none) the norms' and residual inputs are whole
    on every tp rank: (10 + 24 / tp) * hidden bytes per token per layer (Korthikanti et al.
    2022), not 34 / tp. tp=2: 8 tokens x 2 layers x (10 + 12) x 4, logits 3x fp32 of 10 / 2."""
    tr = cost.Work("train_step", n_seqs=2, prompt_len=2, gen_len=2)
    expected = 8 * 2 * (10 + 24 / 2) * 4 + 8 * 5 * 4 * 3
    assert cost.activation_bytes(TOY, Layout(1, 2, 1), tr, DEV) == pytest.approx(expected)


def test_out_of_memory_check():
    assert cost.fits(0.9e6, DEV)
    assert not cost.fits(0.9e6 + 1, DEV)


def test_realloc_bytes_by_hand():
    full = TOY.params * 2
    # to tp=2 on the same device 0 plus device 1: 0 already holds its half, 1 needs half
    moved = cost.realloc_bytes(TOY, Layout(1, 1, 1), (0,), Layout(1, 2, 1), (0, 1), 2)
    assert moved == {0: 0.0, 1: full / 2}
    # d2t1p1 -> d1t1p2 on the same devices: each replica holds its stage's blocks
    assert cost.realloc_bytes(TOY, Layout(2, 1, 1), (0, 1), Layout(1, 1, 2), (0, 1), 2) == {
        0: 0.0,
        1: 0.0,
    }
    # d1t2p1 -> d1t1p2: device 0 keeps the left columns of its stage: needs half of its half
    moved = cost.realloc_bytes(TOY, Layout(1, 2, 1), (0, 1), Layout(1, 1, 2), (0, 1), 2)
    assert moved == {0: pytest.approx(full / 4), 1: pytest.approx(full / 4)}
    # disjoint devices: everything moves
    assert cost.realloc_bytes(TOY, Layout(1, 1, 1), (0,), Layout(1, 1, 1), (1,), 2) == {1: full}


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="'evaluate' is not one of generate"):
        cost.mfc_time(TOY, Layout(), cost.Work("evaluate", 1, 1, 1), DEV, LINKS)


def test_model_spec_errors_name_the_presets():
    with pytest.raises(ValueError, match="did you mean 'llama-70b'"):
        model_spec("llama-70")
    assert math.isclose(model_spec("builtin:tiny").hidden_size, 64)


def test_realloc_bytes_sample_takes_evenly_spaced_devices_with_both_ends():
    full = cost.realloc_bytes(TOY, Layout(1, 1, 1), (0,), Layout(4, 1, 1), (0, 1, 2, 3), 2)
    some = cost.realloc_bytes(
        TOY, Layout(1, 1, 1), (0,), Layout(4, 1, 1), (0, 1, 2, 3), 2, sample=2
    )
    assert some == {0: full[0], 3: full[3]}
