"""Allocation: which workers, in which parallel layout, run each model function call (MFC).

`ExperimentConfig.allocation` takes two forms of entry:

    allocation.<role>=<int>                     every MFC of the role on that worker (d1t1p1@<int>)
    allocation.<mfc or role>=<layout>@<workers>  e.g. allocation.actor_train=d2t1p1@0-1

With ints only (or no allocation at all) a run places one worker per role exactly as before
(indices only group roles; gaps are fine). As soon as one entry is a `<layout>@<workers>` mesh
(realflow/parallel/layout.py), every MFC gets a `Mesh`: its own entry, else its role's
(an int meaning `d1t1p1@<int>`), and worker indices are the workers' global ranks, numbered
0..N-1 without gaps. A trained role whose MFCs use several meshes keeps its training copy on
the mesh of its train_step; the master reallocates the weights to the other meshes
(realflow/system/master.py). Pure Python: no torch import.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from realflow.api.dfg import MFCDef
from realflow.parallel.layout import Layout, Mesh, format_workers

# Interface arguments that skip minibatches by a rank-local decision (PPO's early stop).
EARLY_STOP = ("early_stop_imp_ratio", "early_stop_kl")


def uses_meshes(allocation: dict[str, Any]) -> bool:
    """Whether `allocation` places MFCs on meshes (an entry is `<layout>@<workers>`)."""
    return any(isinstance(v, str) for v in allocation.values())


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """The mesh of every MFC and what follows from it.

    - `meshes`: MFC name -> Mesh; `roles`: MFC name -> its model (role);
    - `train_mesh`: trained role -> the mesh of its train_step (where its training copy lives).
    """

    meshes: dict[str, Mesh]
    roles: dict[str, str]
    train_mesh: dict[str, Mesh]

    @property
    def n_workers(self) -> int:
        return 1 + max(w for m in self.meshes.values() for w in m.workers)

    def mesh_order(self) -> list[Mesh]:
        """Every distinct mesh once, in the fixed order every worker builds their groups in."""
        return sorted(set(self.meshes.values()), key=str)

    def copies(self) -> list[tuple[str, Mesh]]:
        """(role, mesh) of every copy of a model: one per distinct mesh its MFCs use."""
        return sorted({(self.roles[n], m) for n, m in self.meshes.items()}, key=str)

    def reallocs(self) -> list[tuple[str, Mesh, Mesh]]:
        """(role, training mesh, other mesh): the weight moves a step may need."""
        return [
            (role, self.train_mesh[role], mesh)
            for role, mesh in self.copies()
            if role in self.train_mesh and mesh != self.train_mesh[role]
        ]

    def on_worker(self, worker: int) -> list[str]:
        """The MFCs whose mesh holds `worker`, in DFG order."""
        return [n for n, m in self.meshes.items() if worker in m]


def _closest(key: str, names: list[str]) -> str:
    guess = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f"; did you mean 'allocation.{guess[0]}'?" if guess else ""


def _entry(key: str, value: Any) -> tuple[Mesh | None, str | None]:
    """(the mesh of one allocation value, or the problem with it)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None, (
            f"allocation.{key}={value!r}: must be a worker index (e.g. 0) or "
            "<layout>@<workers> (e.g. d2t1p1@0-1)"
        )
    if isinstance(value, int):
        if value < 0:
            return None, f"allocation.{key}: worker index ({value}) must be >= 0"
        return Mesh(Layout(), (value,)), None
    try:
        return Mesh.parse(value), None
    except ValueError as e:
        return None, f"allocation.{key}={value}: {e}"


def resolve_meshes(
    allocation: dict[str, Any], mfcs: list[MFCDef]
) -> tuple[dict[str, Mesh], list[str]]:
    """(MFC name -> Mesh, problems) for an allocation that `uses_meshes`."""
    roles = list(dict.fromkeys(m.model_name for m in mfcs))
    names = [m.name for m in mfcs]
    problems, given = [], {}
    for key, value in allocation.items():
        if key not in names and key not in roles:
            problems.append(
                f"allocation.{key}: unknown key (not an MFC or a role of this run)"
                + (_closest(key, names + roles) or f"; MFCs are {', '.join(names)}")
            )
            continue
        mesh, problem = _entry(key, value)
        if problem:
            problems.append(problem)
        else:
            given[key] = mesh
    meshes, missing = {}, []
    for m in mfcs:
        mesh = given.get(m.name) or given.get(m.model_name)
        if mesh is None:
            if m.name not in allocation and m.model_name not in allocation:
                missing.append(m.name)
            continue
        meshes[m.name] = mesh
    if missing:
        problems.append(
            f"allocation: gives no workers for MFCs {', '.join(missing)}; with a "
            "<layout>@<workers> entry every MFC needs one (its own, e.g. "
            f"allocation.{missing[0]}=d1t1p1@0, or its role's worker index)"
        )
    return meshes, problems


def mesh_problems(cfg: Any, mfcs: list[MFCDef]) -> list[str]:
    """Every problem with a mesh allocation of `cfg` (an ExperimentConfig) for graph `mfcs`."""
    meshes, problems = resolve_meshes(cfg.allocation, mfcs)
    if problems:
        return problems
    used = sorted({w for m in meshes.values() for w in m.workers})
    gaps = sorted(set(range(used[-1] + 1)) - set(used))
    if gaps:
        problems.append(
            f"allocation: with <layout>@<workers> entries, workers are numbered 0..N-1 without "
            f"gaps; worker(s) {format_workers(tuple(gaps))} run nothing (used: "
            f"{format_workers(tuple(used))})"
        )
    by_name = {m.name: m for m in mfcs}
    for name, mesh in meshes.items():
        lay, n = mesh.layout, by_name[name].n_seqs
        where = f"allocation.{name}={mesh}"
        if lay.tp > 1 or lay.pp > 1:
            problems += _shard_problems(cfg, where, by_name[name].model_name, lay)
        if lay.dp > n:
            problems.append(f"{where}: dp ({lay.dp}) must be <= the MFC's n_seqs ({n})")
        args = by_name[name].interface_impl.args
        stops = {k: args[k] for k in EARLY_STOP if args.get(k)}
        if lay.dp > 1 and by_name[name].is_train and stops:
            problems.append(
                f"{where}: early stop ({', '.join(f'{k}={v}' for k, v in stops.items())}) "
                "decides per dp rank, which then run different numbers of collectives; set it "
                "to 0 or give the MFC dp=1"
            )
        if cfg.mode == "local" and len(mesh.workers) > 1:
            problems.append(
                f"{where}: a mesh of {len(mesh.workers)} workers needs mode=ray (its workers "
                "form a torch.distributed group; the threads of mode=local cannot); set mode=ray"
            )
    problems += _role_problems(cfg, mfcs, meshes)
    return problems


def _shard_problems(cfg: Any, where: str, role: str, lay: Layout) -> list[str]:
    """Why `role` cannot run as tp / pp shards (realflow.parallel.runtime.build_shard_model)."""
    spec = cfg.roles()[role]
    c = spec.config
    if spec.head == "none":
        return [f"{where}: {role} has no weights to shard (head 'none'); use d<dp>t1p1"]
    problems = []
    if c.adapters() is not None or c.base_of:
        problems.append(
            f"{where}: a role with adapters (lora/peft) or base_of is not sharded over tensor/"
            f"pipeline parallel layouts (got layout {lay}); use d<dp>t1p1 for {role}"
        )
    if c.backend != "torch":
        problems.append(
            f"{where}: tensor/pipeline parallel shards run on the torch engine backend (got "
            f"{role}.backend={c.backend}); set {role}.backend=torch or use d<dp>t1p1"
        )
    return problems


def _role_problems(cfg: Any, mfcs: list[MFCDef], meshes: dict[str, Mesh]) -> list[str]:
    """What a mesh allocation does not support yet, named by the config key to change."""
    problems = []
    roles = cfg.roles()
    trained = {m.model_name: m for m in mfcs if m.is_train}
    for role, train in trained.items():
        others = {str(meshes[m.name]) for m in mfcs if m.model_name == role} - {
            str(meshes[train.name])
        }
        if not others:
            continue
        c = roles[role].config
        what = f"{role} runs on {', '.join(sorted(others))} besides its training mesh"
        if cfg.mode == "local":
            problems.append(
                f"allocation: {what} ({meshes[train.name]}); moving its weights there "
                "(realloc) needs mode=ray; set mode=ray or give its MFCs one mesh"
            )
        if c.adapters() is not None or c.backend != "torch" or c.offload:
            problems.append(
                f"allocation: {what}; realloc supports the torch backend without adapters or "
                f"offload (got {role}.backend={c.backend}, lora/peft="
                f"{c.adapters() is not None}, offload={c.offload})"
            )
    if cfg.eval_freq_steps > 0:
        problems.append(
            "eval_freq_steps: evaluation with a <layout>@<workers> allocation is not supported "
            "yet; set eval_freq_steps=0 or use worker indices"
        )
    if cfg.weight_copies():
        problems.append(
            f"allocation: weight copies ({', '.join(cfg.weight_copies())}) are not supported "
            "with <layout>@<workers> entries; give the MFC a mesh of its own instead"
        )
    if any(m.filter_loop is not None for m in mfcs):
        problems.append(
            "allocation: a sampling loop (filter MFC) is not supported with <layout>@<workers> "
            "entries yet; use worker indices"
        )
    problems += [
        f"{r}.base_of: not supported with <layout>@<workers> allocation entries yet"
        for r, spec in roles.items()
        if spec.config.base_of
    ]
    return problems


def mesh_plan(cfg: Any, mfcs: list[MFCDef]) -> MeshPlan:
    """The MeshPlan of a validated mesh allocation."""
    meshes, problems = resolve_meshes(cfg.allocation, mfcs)
    assert not problems, problems
    return MeshPlan(
        meshes=meshes,
        roles={m.name: m.model_name for m in mfcs},
        train_mesh={m.model_name: meshes[m.name] for m in mfcs if m.is_train},
    )
