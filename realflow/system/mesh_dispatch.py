"""The master's part for MFCs on meshes (a mesh allocation), from metadata only.

- `MeshDispatch`: launches an MFC on every worker of its mesh, with a realloc step first when
  the mesh holds an older version of the model's weights than its training copy, and merges
  the dp ranks' results into one.
- `dp_parts`: the batch split over the mesh's data-parallel ranks, balanced by token count;
  every tp / pp peer of a dp rank gets the same part.
- `plan_moves`: which worker sends which samples of which keys to which worker, in one global
  order that every worker follows (so two workers never wait on each other's send).
- `merge_stats`: the stats of the dp ranks as one row.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from realflow.api.data import SequenceSample
from realflow.api.dfg import MFCDef
from realflow.experiments.allocation import MeshPlan
from realflow.parallel.layout import Mesh
from realflow.system.mesh import ReallocRequest, ReallocResult
from realflow.system.worker import Kind, MFCRequest, MFCResult, Transfer

if TYPE_CHECKING:
    from realflow.system.master import Call, Master, StepState


@dataclasses.dataclass
class MeshRun:
    """One MFC running on the workers of its mesh: each dp rank computes on `parts[rank]`."""

    parts: list[list[Any]]
    left: set[int]  # the workers still running it
    results: dict[int, MFCResult] = dataclasses.field(default_factory=dict)


class MeshDispatch:
    """What the master does differently for MFCs on meshes. The parameter-version rule stays
    the master's; on top of it, a call on a trained role's other mesh first reallocates the
    weights from the training copy when that mesh holds an older version (`copy_at`)."""

    def __init__(
        self,
        master: Master,
        plan: MeshPlan,
        on_realloc: Callable[[ReallocResult], None] | None = None,
    ):
        self.master = master
        self.plan = plan
        self.on_realloc = on_realloc or (lambda r: None)
        self.model_version: dict[str, int] = {}  # trained role -> train steps done
        self.copy_at: dict[tuple[str, str], int] = {}  # (role, mesh) -> version it holds

    def start(self, first_step: int) -> None:
        """Training copies hold the weights of step first_step - 1 (built, or restored on
        resume with their fp32 masters). The other copies of a trained role are built from the
        same weights on a fresh start; on resume they are filled by a realloc before their
        first call (a checkpoint saved in a lower dtype is not the masters)."""
        self.model_version = {r: first_step - 1 for r in self.plan.train_mesh}
        self.copy_at = {
            (r, str(m)): first_step - 1
            if first_step == 1 or self.plan.train_mesh.get(r, m) == m
            else -1
            for r, m in self.plan.copies()
        }

    def try_launch(self, mfc: MFCDef, state: StepState) -> None:
        """Launch `mfc` on its mesh when every worker it needs is idle: the mesh's, those a
        realloc before it involves, and those that send it inputs."""
        master, mesh = self.master, self.plan.meshes[mfc.name]
        realloc = self.realloc_due(mfc, state.step)
        needed = set(mesh.workers)
        if realloc is not None:
            needed |= set(self.plan.train_mesh[mfc.model_name].workers)
        if not all(master._idle(w) for w in needed):
            return
        inputs = _merge_meta([state.meta[k] for k in dict.fromkeys(mfc.input_keys)])
        parts = dp_parts(inputs, mesh.layout.dp)
        moves = plan_moves(mesh, parts, mfc.input_keys, state.parts, state.meta)
        if master.transport_sends and not all(master._idle(src) for src, _, _ in moves):
            return
        if realloc is not None:
            self._submit_realloc(realloc, mfc)
        for src, dst, t in moves:
            if src not in mesh:
                master._submit(src, Kind.SEND, (dst, t), state.step, mfc.name, busy=True)
            for key in t.meta.keys:
                master._hold(state, key, dst, t.meta.ids)
        release = self.releases_after(mfc, state)
        by_worker: dict[int, list[tuple[int, Transfer]]] = collections.defaultdict(list)
        for src, dst, t in moves:  # each worker's moves, in the order of `moves`
            by_worker[src].append((dst, t))
            if dst != src:
                by_worker[dst].append((dst, t))
        for w in mesh.workers:
            mine = by_worker.get(w, [])
            ids = parts[mesh.coords(w).dp]
            if master.transport_sends:
                req = MFCRequest(mfc.name, state.step, ids, [], state.round, mine, release)
            else:  # read by reference (one-worker meshes only: mode=local)
                req = MFCRequest(mfc.name, state.step, ids, [t for _, t in mine], state.round)
            master._submit(w, Kind.MFC, req, state.step, mfc.name, busy=True)
        state.mesh_runs[mfc.name] = MeshRun(parts, set(mesh.workers))
        state.ready.discard(mfc.name)
        state.running.add(mfc.name)

    def realloc_due(self, mfc: MFCDef, step: int) -> ReallocRequest | None:
        """The realloc to run before `mfc`: its mesh holds an older version of its model's
        weights than the training copy (which train_steps update in place)."""
        role = mfc.model_name
        src = self.plan.train_mesh.get(role)
        dst = self.plan.meshes[mfc.name]
        if src is None or dst == src:
            return None
        latest = self.model_version[role]
        if self.copy_at[(role, str(dst))] >= latest:
            return None
        # The source is the training copy, which stays (release_src=False).
        return ReallocRequest(role, str(src), str(dst), step, latest, release_src=False)

    def releases_after(self, mfc: MFCDef, state: StepState) -> bool:
        """Whether `mfc` is the step's last call on a copy that a realloc fills: its weights
        are then freed after it (the training copy is never freed). Its next call, in a later
        step, comes after a train_step, so a realloc allocates and fills it again."""
        role, mesh = mfc.model_name, self.plan.meshes[mfc.name]
        if self.plan.train_mesh.get(role, mesh) == mesh:
            return False
        same_copy = [
            n for n, m in self.plan.meshes.items() if m == mesh and self.plan.roles[n] == role
        ]
        launched = state.done | state.running | {mfc.name}
        return all(n in launched for n in same_copy)

    def _submit_realloc(self, req: ReallocRequest, mfc: MFCDef) -> None:
        """Queue the realloc on every worker of both meshes, before anything else of `mfc`."""
        src, dst = Mesh.parse(req.src), Mesh.parse(req.dst)
        for w in sorted(set(src.workers) | set(dst.workers)):
            self.master._submit(w, Kind.REALLOC, req, req.step, mfc.name, busy=True)
        self.copy_at[(req.role, req.dst)] = req.version  # later calls there run after it

    def on_result(self, state: StepState, call: Call, result: MFCResult) -> None:
        """One worker's part of a mesh MFC; the last one finishes the MFC: the outputs of each
        dp rank (from its tp rank 0 of the last stage) and the dp ranks' stats merged."""
        self.master.on_call(result)
        run = state.mesh_runs[result.mfc]
        run.left.discard(call.worker)
        run.results[call.worker] = result
        if run.left:
            return
        del state.mesh_runs[result.mfc]
        mesh = self.plan.meshes[result.mfc]
        lay = mesh.layout
        heads = [mesh.worker(d, 0, lay.pp - 1) for d in range(lay.dp)]
        stats = merge_stats([run.results[w].stats for w in heads], [len(p) for p in run.parts])
        outputs = [(w, run.results[w].meta) for w in heads if run.results[w].meta is not None]
        end = max(r.end for r in run.results.values())
        mfc = self.master.by_name[result.mfc]
        self.master._finish_mfc(state, mfc, stats, end, outputs, call)  # type: ignore[arg-type]
        if mfc.is_train:
            self.model_version[mfc.model_name] += 1


def dp_parts(meta: SequenceSample, dp: int) -> list[list[Any]]:
    """The sample ids of each dp rank: `meta` cut into `dp` contiguous parts whose largest
    token count (over all keys of `meta`) is as small as possible."""
    return [list(part.ids) for part in meta.split(dp)]


def subset(
    meta: SequenceSample, ids: Sequence[Any], row: dict[Any, int] | None = None
) -> SequenceSample:
    """The metadata of samples `ids` (in that order) of `meta`; `row`: each id's row in `meta`
    when the caller has it (a mesh of 1024 workers asks for hundreds of subsets of one meta)."""
    if row is None:
        row = {i: r for r, i in enumerate(meta.ids)}
    return meta.index([row[i] for i in ids])


def plan_moves(
    mesh: Mesh,
    parts: list[list[Any]],
    keys: Sequence[str],
    held: dict[str, dict[int, set[Any]]],
    metas: dict[str, SequenceSample],
) -> list[tuple[int, int, Transfer]]:
    """(src, dst, transfer) for every piece of input an MFC's workers lack, sorted by (src,
    dst): each worker of `mesh` needs keys `keys` of its dp rank's samples; `held[key][w]` are
    the samples worker w holds of `key`. A sample comes from the lowest-numbered holder. One
    transfer per (src, dst, samples), carrying all the keys of those samples it sends."""
    pieces: dict[tuple[int, int], dict[tuple[Any, ...], list[str]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    owner: dict[str, dict[Any, int]] = {}  # key -> each sample's lowest-numbered holder
    for key in dict.fromkeys(keys):
        owner[key] = {}
        for src in sorted(held[key], reverse=True):
            owner[key].update(dict.fromkeys(held[key][src], src))
    for w in mesh.workers:
        ids = parts[mesh.coords(w).dp]
        for key in dict.fromkeys(keys):
            mine = held[key].get(w, ())
            missing = [i for i in ids if i not in mine]
            unheld = [i for i in missing if i not in owner[key]]
            assert not unheld, f"no worker holds samples {unheld[:3]} of key {key!r}"
            by_src: dict[int, list[Any]] = collections.defaultdict(list)
            for i in missing:  # in the order of the part, as each source sends them
                by_src[owner[key][i]].append(i)
            for src in sorted(by_src):
                pieces[(src, w)][tuple(by_src[src])].append(key)
    moves = []
    rows: dict[str, dict[Any, int]] = {}  # key -> each sample id's row in metas[key]

    def part(k: str, ids: tuple[Any, ...]) -> SequenceSample:
        if k not in rows:
            rows[k] = {i: r for r, i in enumerate(metas[k].ids)}
        return subset(metas[k], ids, rows[k]).meta()

    for (src, dst), by_ids in sorted(pieces.items()):
        for ids, ks in by_ids.items():
            meta = part(ks[0], ids)
            for k in ks[1:]:
                meta.update_(part(k, ids))
            moves.append((src, dst, Transfer(src, meta)))
    return moves


# Counts of a dp rank's own part, summed over the ranks.
SUMMED_STATS = ("n_tokens",)


def merge_stats(stats: list[dict[str, float]], n_samples: list[int]) -> dict[str, float]:
    """The dp ranks' stats as one row: counts of a rank's part (`SUMMED_STATS`, e.g. an SFT
    step's n_tokens) summed; every other key a mean over the ranks that report it, weighted by
    their sample counts `n_samples`. A train step's loss and loss stats need no weights: the
    engine already reports their loss-weighted (per-token) means over the whole dp group, the
    same on every rank; so do values every rank shares (grad_norm, lr)."""
    sums: dict[str, float] = collections.defaultdict(float)
    totals: dict[str, float] = collections.defaultdict(float)
    for s, n in zip(stats, n_samples, strict=True):
        for k, v in s.items():
            sums[k] += float(v) if k in SUMMED_STATS else float(v) * n
            totals[k] += n
    means = {k: sums[k] / totals[k] if totals[k] else 0.0 for k in sums}
    return {k: sums[k] if k in SUMMED_STATS else means[k] for k in sums}


def _merge_meta(metas: list[SequenceSample]) -> SequenceSample:
    merged = metas[0].meta()
    for m in metas[1:]:
        merged.update_(m.meta())
    return merged
