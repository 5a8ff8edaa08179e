"""The deepspeed backend against the torch backend, in a single-process gloo world."""

import os

import pytest
import torch
import torch.distributed as dist
from engine_testutils import build, make_batch, make_model, train, weights

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def ds_world():
    """One process group (and one deepspeed op build) for the whole module; torn down after."""
    pytest.importorskip("deepspeed")
    from realflow.engines.deepspeed_engine import ensure_process_group

    env = dict(os.environ)
    created = ensure_process_group()
    yield
    if created:
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def batches(n: int = 5) -> list:
    return [make_batch(6, seed=10 + i) for i in range(n)]


@pytest.fixture(scope="module")
def torch_run() -> tuple[list, dict]:
    engine = build("torch")
    stats = train(engine, batches(), n_mbs=3)
    return stats, weights(engine)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_matches_torch(stage, torch_run):
    ref_stats, ref_weights = torch_run
    engine = build("deepspeed", zero_stage=stage)
    stats = train(engine, batches(), n_mbs=3)
    for ref, got in zip(ref_stats, stats):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert got["lr"] == ref["lr"]
    got_weights = weights(engine)
    for k, v in ref_weights.items():
        torch.testing.assert_close(got_weights[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert engine.step == 5


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_grad_accumulation_is_exact(stage):
    one = build("deepspeed", zero_stage=stage)
    three = build("deepspeed", zero_stage=stage)
    train(one, batches(2), n_mbs=1)
    train(three, batches(2), n_mbs=3)
    w1, w3 = weights(one), weights(three)
    for k in w1:
        torch.testing.assert_close(w1[k], w3[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "stage, bf16", [(0, False), (2, False), (3, False), (0, True), (2, True), (3, True)]
)
def test_zero_resume_is_bit_identical(stage, bf16):
    """Saved as bf16 weights (the engine's are fp32 masters), the resumed fp32 master weights
    come from the optimizer state."""
    data = batches()
    straight = build("deepspeed", zero_stage=stage, bf16=bf16)
    train(straight, data, n_mbs=2)

    first = build("deepspeed", zero_stage=stage, bf16=bf16)
    train(first, data[:3], n_mbs=2)
    state, saved_weights = first.state_dict(), weights(first)
    assert all(v.dtype == torch.float32 for v in saved_weights.values())
    if bf16:
        saved_weights = {k: v.to(torch.bfloat16) for k, v in saved_weights.items()}
    resumed = build("deepspeed", zero_stage=stage, bf16=bf16, seed=7, state=saved_weights)
    resumed.load_state_dict(state)
    assert resumed.step == 3
    train(resumed, data[3:], n_mbs=2)
    expected, got = weights(straight), weights(resumed)
    for k, v in expected.items():
        assert torch.equal(v, got[k]), k


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_masters_of_fp32_weights_are_exact(stage):
    """deepspeed builds its fp32 masters from the bf16 cast of the module; the engine writes
    the exact fp32 values back, so bf16 compute does not round the starting point."""
    start = make_model(0).state_dict()
    got = weights(build("deepspeed", zero_stage=stage, bf16=True))
    assert got.keys() == start.keys()
    for k, v in start.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k


def test_forward_no_grad_and_module():
    engine = build("deepspeed", zero_stage=3)
    batch = make_batch(3)
    logits = engine.forward_no_grad(lambda m: m(batch.data["ids"], batch.cu_seqlens("ids")))
    assert logits.shape == (batch.total_tokens("ids"), 48) and not logits.requires_grad
    assert type(engine.module).__name__ == "TinyLM"
