"""Building a model shard for a mesh, and moving whole state dicts in and out of shards.

groups = MeshGroups.build(mesh)
model = build_model(config, "lm", groups)           # this worker's shard (random init)
load_full_state_dict(model, full_sd)                 # or realloc from another layout
full = gather_full_model(model_or_None, config, "lm", mesh, to_rank=0)   # for saving
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from realflow.models.config import TransformerConfig
from realflow.models.transformer import PackedTransformer
from realflow.parallel.flat import FlatParams, param_slots
from realflow.parallel.groups import MeshGroups
from realflow.parallel.layout import Layout, Mesh


def build_model(
    config: TransformerConfig,
    head: str = "lm",
    groups: MeshGroups | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PackedTransformer:
    """This worker's shard of the model in `groups.mesh` (the whole model when None).

    Weights are randomly initialised per shard: load them with `load_full_state_dict` or a
    realloc from a layout that holds them."""
    spec = None if groups is None else groups.shard_spec()
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        model = PackedTransformer(config, head, spec)
    return model if dtype is None else model.to(dtype)


def shard_state_dict(
    model: PackedTransformer, full_sd: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The blocks of a whole-model state dict (realflow names) that `model`'s shard holds,
    keyed by its parameter names (views; copy before changing them)."""
    out = {}
    for s in param_slots(model):
        if s.key not in full_sd:
            raise ValueError(f"state dict has no {s.key!r} (needed for {s.name})")
        full = full_sd[s.key]
        if tuple(full.shape) != s.full_shape:
            raise ValueError(f"{s.key}: shape {tuple(full.shape)}, the model needs {s.full_shape}")
        r = s.rect
        block = full[r.r0 : r.r1, r.c0 : r.c1] if full.dim() == 2 else full[r.r0 : r.r1]
        out[s.name] = block
    return out


@torch.no_grad()
def load_full_state_dict(model: PackedTransformer, full_sd: dict[str, torch.Tensor]) -> None:
    """Copy this shard's blocks of a whole-model state dict into `model`."""
    params = dict(model.named_parameters())
    for name, block in shard_state_dict(model, full_sd).items():
        params[name].copy_(block)


def gather_full_model(
    flat: FlatParams | None,
    config: TransformerConfig,
    head: str,
    mesh: Mesh,
    to_rank: int = 0,
    group: Any = None,
    dtype: torch.dtype | None = None,
) -> PackedTransformer | None:
    """The whole model on worker `to_rank` (None elsewhere), assembled from the shards of
    `mesh` by a realloc to layout d1t1p1 on that worker (e.g. to save an HF checkpoint).

    Every worker of `mesh` and `to_rank` calls it with the same arguments; `flat` is the
    caller's shard (None when it is not in `mesh`). `dtype` (default: the shards') is the
    whole model's dtype; a `to_rank` outside the mesh must be told it."""
    from realflow.parallel.realloc import execute_realloc, plan_realloc

    rank = torch.distributed.get_rank()
    if dtype is None:
        if flat is None:
            raise ValueError(f"worker {rank} holds no shard of {mesh}: pass the model's dtype")
        dtype = flat.dtype
    plan = plan_realloc(config, head, mesh, Mesh(Layout(), (to_rank,)))
    full, full_flat = None, None
    if rank == to_rank:
        with torch.device("meta"):
            full = PackedTransformer(config, head, init_weights=False)
        full = full.to_empty(device=flat.device if flat is not None else "cpu").to(dtype)
        full.tie_weights()
        full_flat = FlatParams(full)
    execute_realloc(plan, flat if rank in mesh else None, full_flat, group=group, wire_dtype=dtype)
    return full
