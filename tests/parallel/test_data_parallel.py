"""Data parallelism composed with tensor and pipeline parallelism, in a 4-process gloo world.

The global batch (5 sequences) is split unevenly over 2 data-parallel replicas (2 and 3
sequences, 1 and 2 micro-batches). With the engine's token-weighted loss, the result must equal
one process training on the whole batch:
  - d2t2p1: the TrainEngine (torch backend, dp_group from the mesh) over tensor-parallel shards:
    weights after two optimizer steps;
  - d2t1p2: the 1F1B pipeline with the engine's loss scales, gradients averaged over dp;
  - d1t2p2: tensor x pipeline parallel in one replica: gradients and their global norm, and
    greedy generation.
"""

import pytest
import torch
import torch.distributed as dist
from parallel_testutils import (
    VOCAB,
    check_greedy_generation,
    reference_model,
    run_world,
    tiny_config,
)

from realflow.api.data import SequenceSample
from realflow.engines import EngineConfig, OptimizerConfig, build_train_engine
from realflow.parallel.grads import grad_norm
from realflow.parallel.groups import MeshGroups
from realflow.parallel.layout import Mesh
from realflow.parallel.model import build_model, load_full_state_dict, shard_state_dict
from realflow.parallel.pipeline import PipelineRunner
from realflow.parallel.vocab import gather_packed_logprobs

pytestmark = pytest.mark.slow

CONFIG = tiny_config("qwen2")  # tied embedding: its two pipeline copies must stay in sync
TOL = dict(rtol=1e-5, atol=1e-5)
# Gradient clipping is off: TorchBackend clips by the norm of the local shard (see
# realflow.parallel.grads.clip_grad_norm_ for the global one).
OPTIM = OptimizerConfig(lr=1e-2, warmup_steps_proportion=0.0, gradient_clipping=0.0)


def batch(seed: int) -> SequenceSample:
    g = torch.Generator().manual_seed(seed)
    lens = [6, 3, 9, 5, 7]
    seqs = [torch.randint(3, VOCAB, (n,), generator=g) for n in lens]
    return SequenceSample.from_sequences(list(range(len(lens))), {"ids": seqs})


def replica_part(b: SequenceSample, dp_rank: int) -> list[SequenceSample]:
    """Replica 0 gets sequences 0-1 (one micro-batch), replica 1 gets 2-4 (two)."""
    return [b.index([0, 1])] if dp_rank == 0 else b.index([2, 3, 4]).split(2)


def inputs(mb: SequenceSample):
    return mb.data["ids"], mb.cu_seqlens("ids")


def n_targets(mb: SequenceSample) -> float:
    return float(sum(n - 1 for n in mb.flat_seqlens("ids")))


def loss_fn(module, mb: SequenceSample):
    ids, cu = inputs(mb)
    logp = gather_packed_logprobs(module(ids, cu), ids, cu, shard=module.vocab_shard)
    return -logp.mean(), {}


def reference_grads(ref, b: SequenceSample) -> dict:
    mbs = b.split(2)
    total = sum(n_targets(mb) for mb in mbs)
    ref.zero_grad()
    for mb in mbs:
        (loss_fn(ref, mb)[0] * n_targets(mb) / total).backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def check_grads(model, want: dict, what: str) -> None:
    expected = shard_state_dict(model, want)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], **TOL, msg=f"{what}: {name}")


def dp_tp_engine(groups: MeshGroups) -> None:
    ref = build_train_engine(reference_model(CONFIG), EngineConfig(), OPTIM, 10)
    model = build_model(CONFIG, "lm", groups)
    load_full_state_dict(model, ref.module.state_dict())
    engine = build_train_engine(model, EngineConfig(), OPTIM, 10, dp_group=groups.dp_group)
    for step in range(2):
        b = batch(seed=step)
        ref.train_batch(b.split(2), loss_fn, n_targets)
        engine.train_batch(replica_part(b, groups.coords.dp), loss_fn, n_targets)
    want = shard_state_dict(model, ref.module.state_dict())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], **TOL, msg=f"d2t2p1 engine: {name}")


def pipeline_grads(groups: MeshGroups, mbs: list[SequenceSample]) -> PipelineRunner:
    """The engine's step without the optimizer: loss scales w_i * dp / sum of w over the dp
    group, 1F1B forward-backward, then the dp gradient average."""
    ref = reference_model(CONFIG)
    model = build_model(CONFIG, "lm", groups)
    load_full_state_dict(model, ref.state_dict())
    total = torch.tensor([sum(n_targets(mb) for mb in mbs)], dtype=torch.float64)
    dist.all_reduce(total, group=groups.dp_group)
    dp = len(groups.dp_ranks)
    scales = [n_targets(mb) * dp / float(total) for mb in mbs]
    runner = PipelineRunner(model, groups)
    runner.forward_backward(mbs, inputs, loss_fn, scales)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=groups.dp_group)
        p.grad /= dp
    want = reference_grads(ref, batch(seed=0))
    check_grads(model, want, str(groups.mesh))
    ref_norm = torch.nn.utils.get_total_norm(list(want.values()))
    assert grad_norm(model, groups) == pytest.approx(float(ref_norm), rel=1e-5)
    if groups.mesh.layout.dp == 1:
        check_greedy_generation(model, groups, ref, f"{groups.mesh} generate")
    return runner


def _worker(rank: int, world: int) -> None:
    dp_tp = MeshGroups.build(Mesh.parse("d2t2p1@0-3"))
    dp_pp = MeshGroups.build(Mesh.parse("d2t1p2@0-3"))
    tp_pp = MeshGroups.build(Mesh.parse("d1t2p2@0-3"))
    dp_tp_engine(dp_tp)
    pipeline_grads(dp_pp, replica_part(batch(seed=0), dp_pp.coords.dp))
    pipeline_grads(tp_pp, batch(seed=0).split(3))


def test_dp_composes_with_tp_and_pp():
    run_world(_worker, 4)
