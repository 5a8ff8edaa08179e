"""A worker's shard of a role's model in a mesh, as the engines and interfaces run it.

    groups = MeshGroups.build(mesh)                  # every worker, same meshes, same order
    model = build_shard_model(name, role, trained, total_train_steps, seed, groups, device)
    interface.train_step(model, data, mb_spec)       # unchanged, on every worker of the mesh

`build_shard_model` is `realflow.system.models.build_model` for one shard: the role's whole
model is built (or given as `full`), cut to this worker's shard (tp ranks, pipeline stage) and
wrapped in the usual engine, whose `parallel` attribute is a `ParallelContext`. Through it:

- `TrainEngine.train_batch` runs the 1F1B pipeline when pp > 1 (same loss scales), averages
  gradients over the mesh's dp group and clips by the global gradient norm;
- the interfaces compute log-probs and entropy vocab-parallel (`module.vocab_shard`), map
  micro-batches through the pipeline (`map_no_grad`), and generate with `parallel_generate`.

Every tp rank and pipeline stage of one dp replica must be given the same data; every rank of
the replica then returns the same outputs and stats (the last stage's, broadcast to the
others), so an interface runs unchanged everywhere. The caller keeps the outputs of tp rank 0
of the last stage (`ParallelContext.is_output_rank`) of each dp replica.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from realflow.models.transformer import PackedTransformer
from realflow.parallel.flat import FlatParams
from realflow.parallel.groups import MeshGroups
from realflow.parallel.model import build_model, gather_full_model, load_full_state_dict
from realflow.parallel.pipeline import PipelineRunner

logger = logging.getLogger(__name__)

IDS = "packed_input_ids"  # what every interface's forward reads (realflow.interfaces.common)


@dataclass
class ParallelContext:
    """How one worker's shard `model` runs in its mesh (`groups`).

    `inputs_key` names the packed ids every stage of a pipeline forwards; micro-batches given to
    `forward_backward` / `map_no_grad` must hold them."""

    model: PackedTransformer
    groups: MeshGroups
    inputs_key: str = IDS
    runner: PipelineRunner | None = field(init=False, default=None)
    _flat: FlatParams | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.groups.member:
            raise ValueError(
                f"worker {self.groups.rank} is not in mesh {self.groups.mesh}: it holds no shard"
            )
        if self.groups.mesh.layout.pp > 1:
            self.runner = PipelineRunner(self.model, self.groups)

    @property
    def sharded(self) -> bool:
        """Whether the model is cut over tp ranks or pipeline stages (not just replicated)."""
        return self.model.shard is not None

    @property
    def pipelined(self) -> bool:
        return self.runner is not None

    @property
    def output_rank(self) -> int:
        """Global rank of tp rank 0 of the last stage of this worker's replica."""
        ranks = self.groups.mp_ranks
        return ranks[len(ranks) - self.groups.mesh.layout.tp]

    @property
    def is_output_rank(self) -> bool:
        return self.groups.rank == self.output_rank

    def inputs(self, mb: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """`(ids_T, cu_seqlens_B1)` of a micro-batch on the model's device."""
        if self.inputs_key not in mb.data:
            raise ValueError(
                f"a pipeline stage forwards {self.inputs_key!r}, but the micro-batch holds "
                f"{sorted(mb.data)}"
            )
        device = self.model.device
        return mb.data[self.inputs_key].to(device), mb.cu_seqlens(self.inputs_key, device=device)

    def forward_backward(
        self,
        micro_batches: Sequence[Any],
        loss_fn: Callable[[Any, Any], tuple[torch.Tensor, dict[str, float]]],
        scales: Sequence[float],
    ) -> list[tuple[float, dict[str, float]]]:
        """The 1F1B pipeline's forward and backward (gradient of `sum_i scales[i] * loss_i`);
        `(loss_i, stats_i)` of the last stage on every rank of the replica."""
        if self.runner is None:
            raise ValueError("forward_backward runs a pipeline; this mesh has pp = 1")
        results = self.runner.forward_backward(micro_batches, self.inputs, loss_fn, scales)
        return self.broadcast_outputs(results)

    def map_no_grad(self, micro_batches: Sequence[Any], fn: Callable[[Any, Any], Any]) -> list:
        """`[fn(module, mb) for mb]` through the pipeline (call it without grad): the last
        stage computes them, every rank of the replica gets them."""
        if self.runner is None:
            return [fn(self.model, mb) for mb in micro_batches]
        return self.broadcast_outputs(self.runner.forward(micro_batches, self.inputs, fn))

    def broadcast_outputs(self, outputs: list) -> list:
        """The output rank's `outputs` on every rank of the replica (tensors keep their
        dtype and land on the model's device)."""
        if len(self.groups.mp_ranks) == 1:
            return outputs
        box = [_to_cpu(outputs) if self.is_output_rank else None]
        dist.broadcast_object_list(box, src=self.output_rank, group=self.groups.mp_group)
        return _to_device(box[0], self.model.device)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip by the norm of the whole model's gradient (every block counted once)."""
        from realflow.parallel.grads import clip_grad_norm_

        return clip_grad_norm_(self.model, max_norm, self.groups)

    def generate(self, module: Any, input_ids_T, cu_seqlens_B1, gconfig, generator, n_per_prompt):
        """`realflow.models.generation.generate` over the replica's tp x pp workers."""
        from realflow.parallel.generate import parallel_generate

        return parallel_generate(
            module, self.groups, input_ids_T, cu_seqlens_B1, gconfig, generator, n_per_prompt
        )

    def flat_params(self) -> FlatParams:
        """This shard's `FlatParams` (made on first use, remade when the parameters moved,
        e.g. after an offload): use this one for realloc, never a second FlatParams."""
        if self._flat is None or not _bound(self._flat):
            self._flat = FlatParams(self.model)
        return self._flat

    def gather_full_model(self, to_rank: int, dtype: torch.dtype | None = None):
        """The whole model on worker `to_rank` (None elsewhere); every worker of the mesh
        calls it (see realflow.parallel.model.gather_full_model)."""
        return gather_full_model(
            self.flat_params(), self.model.config, self.model.head, self.groups.mesh, to_rank,
            dtype=dtype,
        )  # fmt: skip


def _bound(flat: FlatParams) -> bool:
    if flat.released:
        return True
    ptr = flat.buffer.untyped_storage().data_ptr()
    return all(p.untyped_storage().data_ptr() == ptr for p in flat.params)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


# ---- building --------------------------------------------------------------------------------


def shard_of(full: PackedTransformer, groups: MeshGroups) -> PackedTransformer:
    """This worker's shard of `full` (same dtype and device, same requires_grad), a copy."""
    if full.shard is not None:
        raise ValueError(f"shard_of needs the whole model, got a shard ({full.shard})")
    param = next(full.parameters())
    model = build_model(full.config, full.head, groups, device=param.device, dtype=param.dtype)
    load_full_state_dict(model, full.state_dict())
    model.requires_grad_(param.requires_grad)
    return model


def shard_engine(
    full: PackedTransformer,
    groups: MeshGroups,
    engine_cfg: Any,
    optim_cfg: Any = None,
    total_train_steps: int = 0,
) -> Any:
    """A `TrainEngine` (with `optim_cfg`) or an `InferenceEngine` (without) over this
    worker's shard of `full`, with `engine.parallel` set and the mesh's dp group."""
    from realflow.engines.train import EngineError, InferenceEngine, build_train_engine

    if engine_cfg.backend != "torch":
        raise EngineError(
            f"a model sharded over mesh {groups.mesh} needs engine backend 'torch', got "
            f"{engine_cfg.backend!r}; use the torch backend or layout d<n>t1p1"
        )
    model = shard_of(full, groups)
    parallel = ParallelContext(model, groups)
    if optim_cfg is None:
        model.requires_grad_(False)
        engine = InferenceEngine(model, engine_cfg, parallel=parallel)
    else:
        engine = build_train_engine(
            model, engine_cfg, optim_cfg, total_train_steps, groups.dp_group, parallel=parallel
        )
    logger.info("built %s shard %s of %s", groups.mesh, model.shard, type(engine).__name__)
    return engine


def build_shard_model(
    name: str,
    role: Any,
    trained: bool,
    total_train_steps: int,
    seed: int,
    groups: MeshGroups,
    device: torch.device | str = "cpu",
    full: PackedTransformer | None = None,
) -> Any:
    """`realflow.system.models.build_model` for this worker's shard in `groups.mesh`: a
    `Model` whose engine runs the shard (see the module docstring). `full` is the role's whole
    model when the caller has it (e.g. built once per process); else it is built here from the
    role (HF path or built-in, seeded like `build_model`). Roles with adapters or `base_of`
    are not sharded: a ValueError."""
    from realflow.api.interface import Model
    from realflow.system.models import build_module, load_role_tokenizer, weights_dtype

    if role.config.adapters() is not None or role.config.base_of:
        raise ValueError(
            f"{name}: a role with adapters or base_of cannot be sharded over mesh "
            f"{groups.mesh}; give it layout d1t1p1"
        )
    if role.head == "none":
        raise ValueError(f"{name}: a role without weights (head 'none') has nothing to shard")
    device = torch.device(device)
    if full is None:
        full = build_module(role, seed, weights_dtype(role, trained, device), device)
    engine = shard_engine(
        full,
        groups,
        role.config.engine_config(device.type),
        role.config.optimizer if trained else None,
        total_train_steps,
    )
    return Model(name=name, module=engine, tokenizer=load_role_tokenizer(role))
