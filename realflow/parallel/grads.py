"""The gradient norm of a tensor / pipeline-parallel model, and clipping by it.

Each worker of a replica holds blocks of the parameters; some blocks are held by several
workers (norms and biases replicated over tp, kv heads shared by tp ranks, a tied embedding on
the first and last stage). The global norm counts every block once: each worker adds
`|g|^2 / copies` for its blocks and the replica's workers (`mp_group`) sum. Data-parallel
replicas hold the same (averaged) gradients, so they need no reduction.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.distributed as dist

from realflow.models.transformer import PackedTransformer
from realflow.parallel.flat import param_slots, slots_for
from realflow.parallel.groups import MeshGroups


def _copies(model: PackedTransformer) -> dict[tuple, int]:
    """(key, rect) -> how many workers of one replica hold that block."""
    spec = model.shard
    counts: Counter = Counter()
    for stage in range(spec.pp_size):
        for tp_rank in range(spec.tp_size):
            for s in slots_for(
                model.config, model.head, spec.tp_size, spec.pp_size, tp_rank, stage
            ):
                counts[(s.key, s.rect)] += 1
    return counts


def grad_norm(model: PackedTransformer, groups: MeshGroups | None = None) -> float:
    """The L2 norm of the whole model's gradient (every worker of the replica gets it)."""
    params = dict(model.named_parameters())
    sharded = model.shard is not None
    copies = _copies(model) if sharded else {}
    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for s in param_slots(model):
        grad = params[s.name].grad
        if grad is not None:
            n = copies.get((s.key, s.rect), 1)
            total += grad.detach().double().pow(2).sum() / n
    if sharded:
        if groups is None or groups.mp_group is None:
            raise ValueError("grad_norm of a sharded model needs its MeshGroups")
        dist.all_reduce(total, group=groups.mp_group)
    return math.sqrt(float(total))


@torch.no_grad()
def clip_grad_norm_(
    model: PackedTransformer, max_norm: float, groups: MeshGroups | None = None
) -> float:
    """Scale the gradients so the global norm is at most `max_norm` (0 or inf: no clipping);
    returns the norm before clipping (as torch.nn.utils.clip_grad_norm_)."""
    norm = grad_norm(model, groups)
    if max_norm > 0 and math.isfinite(max_norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm
