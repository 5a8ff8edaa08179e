"""Data parallelism in a multi-process gloo world.

Ranks 0 and 1 hold the model and train on uneven halves of each batch (so they also run
different numbers of micro-batches); the result must equal one process training on the whole
batch. In the 3-rank world, rank 2 stands for another model's worker: it never joins the
model's collectives, so any world-wide collective in the engine would hang the test.
"""

import datetime
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from engine_testutils import build, loss_fn, make_batch, n_targets, train, weights

from realflow.engines import EngineError

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

MODEL_RANKS = [0, 1]


def batches() -> list:
    return [make_batch(6, seed=20 + i) for i in range(3)]


def _train_half(rank: int, backend: str, stage: int, group: object) -> dict:
    engine = build(backend, zero_stage=stage, dp_group=group)
    for b in batches():
        part = b.index(range(0, 2) if rank == 0 else range(2, 6))
        engine.train_batch(part.split(1 if rank == 0 else 3), loss_fn, n_targets)
    return weights(engine)


def _worker(rank: int, world: int, port: int, out_dir: str, configs: list) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    group = dist.new_group(MODEL_RANKS)
    if rank in MODEL_RANKS:
        for backend, stage in configs:
            if stage == 3 and world > len(MODEL_RANKS):
                with pytest.raises(EngineError, match="ZeRO-3 needs a dp group spanning"):
                    build(backend, zero_stage=stage, dp_group=group)
                continue
            w = _train_half(rank, backend, stage, group)
            if rank == 0:
                torch.save(w, os.path.join(out_dir, f"{backend}{stage}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Interpreter teardown after deepspeed's CPU shm comm op takes ~8 s; skip it on success.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference() -> dict:
    engine = build("torch")
    train(engine, batches(), n_mbs=1)
    return weights(engine)


@pytest.mark.parametrize(
    "world, configs",
    [
        (3, [("torch", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]),
        (2, [("deepspeed", 3)]),
    ],
    ids=["subgroup", "world"],
)
def test_dp_equals_single_process(world, configs, reference, tmp_path):
    pytest.importorskip("deepspeed")
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), configs), nprocs=world)
    for backend, stage in configs:
        if stage == 3 and world > len(MODEL_RANKS):
            continue
        got = torch.load(tmp_path / f"{backend}{stage}.pt")
        for k, v in reference.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"{backend}{stage} {k}")
