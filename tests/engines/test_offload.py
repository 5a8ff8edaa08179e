"""Offload of trained models: weights, gradients and optimizer state leave the accelerator
between calls and come back before one. On CPU nothing moves (said once in the log) and the
numbers are those of a run without offload; the move itself needs CUDA (skipped without)."""

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
)
from realflow.engines.offload import move_train_state


def batches(n: int = 3) -> list:
    return [make_batch(6, seed=40 + i) for i in range(n)]


def test_a_move_that_replaces_the_parameters_is_refused():
    """The optimizer holds the parameter objects: a move must keep them (the meta device does
    not), or the optimizer would go on stepping stale copies."""
    engine = build()
    train(engine, batches(1))
    with pytest.raises(RuntimeError, match="replaced its parameter objects"):
        move_train_state(engine.module, engine.backend.optimizer, "meta")


def test_offload_on_cpu_moves_nothing_says_so_once_and_trains_alike(caplog):
    plain, offloaded = build(), build(offload=True)
    with caplog.at_level(logging.INFO, logger="realflow.engines.offload"):
        offloaded.offload()  # as the worker does after setup
        for batch in batches():
            offloaded.onload()
            offloaded.train_batch([batch], loss_fn, n_targets)
            offloaded.offload()
            plain.train_batch([batch], loss_fn, n_targets)
        inference = InferenceEngine(offloaded.module, EngineConfig(offload=True))
        for _ in range(3):
            inference.offload()
            inference.onload()
    said = [r.getMessage() for r in caplog.records if "nothing to move" in r.getMessage()]
    assert said == ["offload of TinyLM: nothing to move (it is on cpu)"] * 2  # once per engine
    assert not offloaded.offloaded
    want, got = weights(plain), weights(offloaded)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_deepspeed_offload_is_refused():
    with pytest.raises(EngineError, match="offload .* not supported with backend 'deepspeed'"):
        build("deepspeed", offload=True)


def cuda_loss(module, mb):
    """engine_testutils.loss_fn with the micro-batch moved to CUDA."""
    ids, cu = mb.data["ids"].cuda(), mb.cu_seqlens("ids").cuda()
    logits = module(ids, cu).float()
    keep = torch.ones(ids.shape[0], dtype=torch.bool, device="cuda")
    keep[cu[1:] - 1] = False
    return torch.nn.functional.cross_entropy(logits[keep], ids.roll(-1)[keep]), {}


@pytest.mark.cuda  # offload moves something only on CUDA
def test_cuda_offload_frees_the_device_and_trains_alike():
    def engine(offload: bool):
        return build_train_engine(
            make_model(0).cuda(),
            EngineConfig(offload=offload),
            OptimizerConfig(lr=1e-2),
            total_train_steps=10,
        )

    plain, moved = engine(False), engine(True)
    for i, batch in enumerate(batches()):
        plain.train_batch([batch], cuda_loss, n_targets)
        moved.train_batch([batch], cuda_loss, n_targets)  # brings it back when offloaded
        before = torch.cuda.memory_allocated()
        moved.offload()
        assert moved.offloaded
        assert all(p.device.type == "cpu" for p in moved.module.parameters())
        moments = [t for s in moved.backend.optimizer.state.values() for t in s.values()]
        assert all(t.device.type == "cpu" for t in moments)
        held = sum(p.numel() * 4 * 3 for p in moved.module.parameters())  # weights, 2 moments
        assert torch.cuda.memory_allocated() <= before - held, i
    moved.onload()
    assert all(p.is_cuda for p in moved.module.parameters())
    want, got = weights(plain), weights(moved)
    for k in want:
        assert got[k].is_cuda and torch.equal(got[k], want[k]), k
