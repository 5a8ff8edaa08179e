import io
import logging

import pytest
import torch
from engine_testutils import build, loss_fn, make_batch, make_model, n_targets, train, weights

from realflow.engines import (
    EngineConfig,
    EngineError,
    InferenceEngine,
    OptimizerConfig,
    build_train_engine,
    lr_at,
)


def batches(n: int = 5) -> list:
    return [make_batch(6, seed=i) for i in range(n)]


def assert_close_weights(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


def test_grad_accumulation_is_exact_for_a_token_mean():
    one = build()
    three = build()
    s1 = train(one, batches(2), n_mbs=1)
    s3 = train(three, batches(2), n_mbs=3)
    assert_close_weights(weights(one), weights(three))
    for a, b in zip(s1, s3):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_variable_micro_batch_counts_per_step():
    ref, var = build(), build()
    data = batches(3)
    train(ref, data, n_mbs=1)
    for b, k in zip(data, [4, 1, 2]):
        var.train_batch(b.split(k), loss_fn, n_targets)
    assert_close_weights(weights(ref), weights(var))


def test_stats_are_weighted_means():
    engine = build()
    batch = make_batch(6, seed=3)
    before = engine.forward_no_grad(lambda m: loss_fn(m, batch)[0].item())
    mbs = batch.split(3)
    stats = engine.train_batch(mbs, loss_fn, n_targets)
    ns = [n_targets(mb) for mb in mbs]
    assert stats["loss"] == pytest.approx(before, rel=1e-6)  # token mean of the whole batch
    assert stats["n_targets"] == pytest.approx(sum(n * n for n in ns) / sum(ns))
    assert set(stats) == {"loss", "grad_norm", "lr", "n_targets"}
    assert engine.step == 1


def test_lr_follows_schedule_and_reaches_optimizer():
    engine = build(total_steps=10, warmup_steps_proportion=0.3, min_lr_ratio=0.1)
    cfg = engine.optim_cfg
    for step, b in enumerate(batches(6)):
        assert engine.lr == lr_at(cfg, step, 10)
        stats = engine.train_batch([b], loss_fn, n_targets)
        assert stats["lr"] == lr_at(cfg, step, 10)
        groups = engine.backend.optimizer.param_groups
        assert all(g["lr"] == stats["lr"] for g in groups)
    assert engine.step == 6


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_clipping_bounds_the_grad_norm(clip):
    engine = build(gradient_clipping=clip)
    seen = []

    def record(optimizer, *_):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        seen.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item())

    engine.backend.optimizer.register_step_pre_hook(record)
    batch = make_batch(6, seed=1)
    model = make_model()
    loss, _ = loss_fn(model, batch)
    loss.backward()
    raw = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    stats = engine.train_batch(batch.split(2), loss_fn, n_targets)
    assert stats["grad_norm"] == pytest.approx(raw.item(), rel=1e-5)  # reported before clipping
    if clip:
        assert raw.item() > clip
        assert seen[0] <= clip * (1 + 1e-5)
        assert seen[0] == pytest.approx(clip, rel=1e-4)
    else:
        assert seen[0] == pytest.approx(raw.item(), rel=1e-5)


def test_resume_is_bit_identical():
    data = batches(5)
    straight = build()
    train(straight, data, n_mbs=2)

    first = build()
    train(first, data[:3], n_mbs=2)
    buf = io.BytesIO()
    torch.save({"engine": first.state_dict(), "weights": weights(first)}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = build(seed=123, state=saved["weights"])  # other init, overwritten by the weights
    resumed.load_state_dict(saved["engine"])
    assert resumed.step == 3 and resumed.lr == first.lr
    train(resumed, data[3:], n_mbs=2)
    for k, v in weights(straight).items():
        assert torch.equal(v, weights(resumed)[k]), k


def test_state_dict_is_a_copy():
    engine = build()
    train(engine, batches(1))
    state = engine.state_dict()
    exp_avg = state["backend_state"]["optimizer"]["state"][0]["exp_avg"].clone()
    train(engine, batches(1))
    assert torch.equal(state["backend_state"]["optimizer"]["state"][0]["exp_avg"], exp_avg)


def test_forward_no_grad_restores_mode():
    engine = build()
    batch = make_batch(2)

    def fn(m):
        assert not m.training and not torch.is_grad_enabled()
        return m(batch.data["ids"], batch.cu_seqlens("ids"))

    engine.module.train()
    out = engine.forward_no_grad(fn)
    assert not out.requires_grad and engine.module.training


def test_bf16_autocast():
    model = make_model()
    engine = build_train_engine(
        model, EngineConfig(bf16=True), OptimizerConfig(lr=1e-2), total_train_steps=3
    )
    batch = make_batch(4)
    logits = engine.forward_no_grad(lambda m: m(batch.data["ids"], batch.cu_seqlens("ids")))
    assert logits.dtype == torch.bfloat16
    stats = engine.train_batch(batch.split(2), loss_fn, n_targets)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert model.fc.weight.dtype == torch.float32  # master weights stay fp32


def test_inference_engine_and_offload_are_noops_on_cpu(caplog):
    model = make_model()
    engine = InferenceEngine(model, EngineConfig(offload=True, bf16=True))
    batch = make_batch(2)
    with caplog.at_level(logging.INFO, logger="realflow.engines.offload"):
        engine.offload()
        engine.onload()
    assert "nothing to move (it is on cpu)" in caplog.text and not engine.offloaded
    out = engine.forward_no_grad(lambda m: m(batch.data["ids"], batch.cu_seqlens("ids")))
    assert out.dtype == torch.bfloat16 and model.training
    train_engine = build()
    with caplog.at_level(logging.INFO, logger="realflow.engines.offload"):
        train_engine.offload()
        train_engine.onload()
    assert caplog.text.count("nothing to move") == 2
    assert "nothing to move (offload is off)" in caplog.text


def test_misuse_raises_clear_errors():
    engine = build()
    with pytest.raises(EngineError, match="at least one micro-batch"):
        engine.train_batch([], loss_fn, n_targets)
    with pytest.raises(EngineError, match="sum to 0"):
        engine.train_batch([make_batch(2)], loss_fn, lambda mb: 0.0)
    with pytest.raises(EngineError, match=r"lr \(-1.0\) must be positive"):
        build(lr=-1.0)
    with pytest.raises(EngineError, match=r"total_train_steps \(0\) must be positive"):
        build(total_steps=0)
    state = engine.state_dict()
    state["backend"] = "deepspeed"
    with pytest.raises(EngineError, match="backend 'deepspeed' cannot load into backend 'torch'"):
        engine.load_state_dict(state)
