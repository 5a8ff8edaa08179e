"""A worker's model copies on meshes (`allocation.<mfc>=<layout>@<workers>`), and realloc.

With a mesh allocation (realflow/experiments/allocation.py) a worker holds one copy of a model
per distinct mesh of that model's MFCs that it belongs to, keyed by (role, mesh). The copy on
the mesh of the role's train_step is the training copy (a train engine whose dp group is the
mesh's); the others are inference copies that the master refreshes by a realloc step
(`Kind.REALLOC`) when the training copy has a newer parameter version.

`build_mesh_model` is the one place a copy is built: for tp = pp = 1 it is the single-device
path (`realflow.system.models.build_model`) with the mesh's dp group; for tp > 1 or pp > 1 it
is this worker's shard (`realflow.parallel.runtime.build_shard_model`), whose engine runs the
interfaces unchanged and whose `engine.parallel.flat_params()` realloc reads and writes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from realflow.api.config import ConfigError
from realflow.api.interface import Model
from realflow.experiments.allocation import MeshPlan
from realflow.experiments.common import ExperimentConfig, ModelRole
from realflow.parallel.layout import Mesh

logger = logging.getLogger(__name__)

# What realloc sends: the training copy is fp32 masters, and every copy is built in fp32 on CPU.
# TODO(bf16 generation copies): send bf16 when the destination copy is bf16.
WIRE_DTYPE = torch.float32


@dataclasses.dataclass(frozen=True)
class ReallocRequest:
    """Move `role`'s weights (parameter version `version`) from mesh `src` to mesh `dst`; every
    worker of either mesh runs it. `release_src` frees the source copy afterwards."""

    role: str
    src: str  # Mesh as text, e.g. d2t1p1@0-1
    dst: str
    step: int
    version: int
    release_src: bool = False

    @property
    def name(self) -> str:
        return f"realloc {self.role} {self.src} -> {self.dst}"


@dataclasses.dataclass
class ReallocResult:
    """One worker's part of a realloc, for the trace."""

    request: ReallocRequest
    worker: int
    start: float
    end: float
    sent_bytes: int
    recv_bytes: int
    local_bytes: int


def build_mesh_model(
    name: str,
    role: ModelRole,
    trained: bool,
    total_train_steps: int,
    seed: int,
    groups: Any,
    device: torch.device,
    full: torch.nn.Module | None = None,
) -> Model:
    """This worker's copy of `role` for the mesh of `groups` (a MeshGroups it is a member of):
    a train engine over the mesh's dp group when `trained`, an inference engine otherwise.

    tp = pp = 1 builds the whole model exactly as a single worker does (same seed, same weights
    on every dp rank); tp > 1 or pp > 1 builds this worker's shard of it, cut from `full` (the
    role's whole model, built in this copy's dtype) when given, else from a fresh build."""
    from realflow.system.models import build_model

    lay = groups.mesh.layout
    if lay.tp > 1 or lay.pp > 1:
        from realflow.parallel.runtime import build_shard_model

        return build_shard_model(
            name, role, trained, total_train_steps, seed, groups, device, full=full
        )
    dp_group = groups.dp_group if trained else None
    return build_model(name, role, trained, total_train_steps, seed, dp_group, device=device)


def is_sharded(mesh: Mesh) -> bool:
    """Whether a copy on `mesh` is a tp / pp shard (else a whole model per worker)."""
    return mesh.layout.tp > 1 or mesh.layout.pp > 1


def role_model_config(role: ModelRole) -> Any:
    """The TransformerConfig of a role's model (read from config.json; nothing is built). A
    `builtin:<task>-sft` is `builtin:tiny` trained: the same config."""
    path = role.config.path
    if path.startswith("builtin:"):
        from realflow.data.tokenizer import load_tokenizer
        from realflow.models.builtin import builtin_config

        return builtin_config("tiny-llama", len(load_tokenizer("builtin")))
    from realflow.models.hf_io import config_from_hf_dir

    return config_from_hf_dir(path)


def check_mesh_layouts(cfg: ExperimentConfig, plan: MeshPlan) -> None:
    """Raise ConfigError listing every MFC whose layout cannot shard its model (tp must divide
    the heads, ...: `realflow.parallel.partition.layout_errors`). Needs resolved model paths."""
    from realflow.parallel.partition import layout_errors

    roles, problems = cfg.roles(), []
    for name, mesh in plan.meshes.items():
        role = roles[plan.roles[name]]
        if role.head == "none" or (mesh.layout.tp == 1 and mesh.layout.pp == 1):
            continue
        for e in layout_errors(role_model_config(role), mesh.layout):
            problems.append(f"allocation.{name}={mesh}: {e}")
    if problems:
        raise ConfigError(problems)


def describe_reallocs(cfg: ExperimentConfig, plan: MeshPlan) -> list[str]:
    """One line per realloc a step may run (for --dry-run): which role, between which meshes,
    and the plan's messages and elements when the model's config can be read."""
    from realflow.parallel.realloc import plan_realloc

    lines = []
    roles = cfg.with_role_defaults().roles()
    for role, src, dst in plan.reallocs():
        head = roles[role].head
        try:
            config = role_model_config(roles[role])
        except (OSError, ValueError) as e:  # e.g. a builtin:<task>-sft not made yet
            lines.append(f"realloc {role} {src} -> {dst} (sizes unknown: {e})")
            continue
        lines.append(f"{plan_realloc(config, head, src, dst).describe()} ({role})")
    return lines


def describe_allocation(cfg: ExperimentConfig, plan: MeshPlan) -> str:
    """The mesh of every MFC and the realloc steps of one step, as --dry-run prints them."""
    lines = [f"  {name}: {plan.roles[name]} on {mesh}" for name, mesh in plan.meshes.items()]
    reallocs = describe_reallocs(cfg, plan)
    lines += ["realloc steps (before an MFC whose mesh holds older weights):"]
    lines += [f"  {r}" for r in reallocs] or ["  none"]
    return "\n".join(lines)


class MeshCopies:
    """The model copies of one worker under a mesh allocation, and its part of each realloc."""

    def __init__(self, worker: int, plan: MeshPlan):
        self.worker = worker
        self.plan = plan
        self.groups: dict[Mesh, Any] = {}
        self.models: dict[tuple[str, Mesh], Model] = {}
        self.flats: dict[tuple[str, Mesh], Any] = {}  # copies that take part in a realloc
        self.plans: dict[tuple[str, str, str], Any] = {}  # realloc plans, per (role, src, dst)

    def build(
        self, cfg: ExperimentConfig, total_train_steps: int, device: torch.device
    ) -> dict[str, Model]:
        """Build the process groups of every mesh of the run (collective: every worker, the
        same order), then this worker's copies. Returns a copy per role held here (the
        training copy when there is one), for what is per role: tokenizers, checkpoints."""
        from realflow.parallel.groups import MeshGroups

        for mesh in self.plan.mesh_order():
            if torch.distributed.is_initialized():
                self.groups[mesh] = MeshGroups.build(mesh)
            else:  # mode=local: one-worker meshes only (validated), no process group
                coords = mesh.coords(self.worker) if self.worker in mesh else None
                self.groups[mesh] = MeshGroups(mesh, self.worker, coords)
        roles = cfg.roles()
        moving = {r for r, _, _ in self.plan.reallocs()}
        per_role: dict[str, Model] = {}
        wholes: dict[tuple[str, Any], torch.nn.Module] = {}  # shards of a role cut from one
        for role, mesh in self.plan.copies():
            if self.worker not in mesh:
                continue
            trained = self.plan.train_mesh.get(role) == mesh
            full = None
            if is_sharded(mesh) and roles[role].head != "none":
                full = self._whole(wholes, role, roles[role], trained, cfg.seed, device)
            model = build_mesh_model(
                role, roles[role], trained, total_train_steps, cfg.seed, self.groups[mesh],
                device, full=full,
            )  # fmt: skip
            self.models[(role, mesh)] = model
            if role in moving and model.module is not None:
                self.flats[(role, mesh)] = self._flat_of(model)
            if trained or role not in per_role:
                per_role[role] = model
        return per_role

    @staticmethod
    def _whole(
        wholes: dict, name: str, role: ModelRole, trained: bool, seed: int, device: torch.device
    ) -> torch.nn.Module:
        """The role's whole model in the dtype of a copy (`trained` or not), built once per
        worker for all the shards of the role it holds (each shard is a copy of its part)."""
        from realflow.system.models import build_module, weights_dtype

        dtype = weights_dtype(role, trained, device)
        if (name, dtype) not in wholes:
            wholes[(name, dtype)] = build_module(role, seed, dtype, device)
        return wholes[(name, dtype)]

    @staticmethod
    def _flat_of(model: Model) -> Any:
        """The FlatParams realloc uses for a copy: a shard's own (`engine.parallel`, made once
        per model), else one over the whole module."""
        from realflow.parallel.flat import FlatParams

        parallel = getattr(model.module, "parallel", None)
        if parallel is not None:
            return parallel.flat_params()
        return FlatParams(model.module.module)

    def model(self, mfc: str) -> Model:
        return self.models[(self.plan.roles[mfc], self.plan.meshes[mfc])]

    def keeps_outputs(self, mfc: str) -> bool:
        """Whether this worker's outputs of `mfc` are its dp rank's: tp rank 0 of the last
        pipeline stage (the master reads them there; its peers drop theirs)."""
        mesh = self.plan.meshes[mfc]
        c = mesh.coords(self.worker)
        return c.tp == 0 and c.pp == mesh.layout.pp - 1

    def saves(self, role: str) -> bool:
        """Whether this worker calls `role`'s save: the first worker of its training mesh,
        which writes the HF checkpoint; with tp / pp every worker of that mesh (the save gathers
        the shards, a collective, and the first worker alone writes the whole model)."""
        mesh = self.plan.train_mesh.get(role)
        if mesh is None or self.worker not in mesh:
            return False
        return is_sharded(mesh) or mesh.workers[0] == self.worker

    def release(self, mfc: str) -> None:
        """Free the weights of the copy `mfc` runs on (not the training copy's: it is kept)."""
        key = (self.plan.roles[mfc], self.plan.meshes[mfc])
        assert self.plan.train_mesh.get(key[0]) != key[1], f"{mfc}: the training copy stays"
        self.flats[key].release()

    def versions(self) -> dict[str, int]:
        return {f"{r}@{m}": model.version for (r, m), model in self.models.items()}

    def load_versions(self, versions: dict[str, int]) -> None:
        for (r, m), model in self.models.items():
            model.version = versions[f"{r}@{m}"]

    def realloc(self, req: ReallocRequest) -> ReallocResult:
        """This worker's part of moving `req.role`'s weights from `req.src` to `req.dst`."""
        from realflow.parallel.realloc import execute_realloc, plan_realloc

        start = time.time()
        src, dst = Mesh.parse(req.src), Mesh.parse(req.dst)
        key = (req.role, req.src, req.dst)
        src_flat = self.flats.get((req.role, src))
        dst_flat = self.flats.get((req.role, dst))
        if key not in self.plans:
            module = (src_flat or dst_flat).model
            head = self._head(req.role)
            self.plans[key] = plan_realloc(module.config, head, src, dst)
        stats = execute_realloc(
            self.plans[key],
            src_flat,
            dst_flat,
            release_src=req.release_src,
            wire_dtype=WIRE_DTYPE,
        )
        if (req.role, dst) in self.models:
            self.models[(req.role, dst)].version = req.version
        return ReallocResult(
            req, self.worker, start, time.time(), stats.sent_bytes, stats.recv_bytes,
            stats.local_bytes,
        )  # fmt: skip

    def _head(self, role: str) -> str:
        for (r, _), model in self.models.items():
            if r == role:
                return model.module.module.head
        raise AssertionError(f"worker {self.worker} holds no copy of {role}")
