"""The simulator's only contact with realflow.system.master: the real `Master`, with the plan's
meshes as its mesh allocation, driven by a transport whose calls take simulated time on a
virtual clock.

`run_master(...)` runs the real master's loop over `n_steps` steps: readiness, the parameter-
version rule, at most two steps in flight, each MFC on every worker of its mesh, the data
worker's batch loads, and the realloc calls `MeshDispatch` inserts before a call on a trained
role's other mesh (on every worker of both meshes). What it changes, and nothing else:

- `SimTransport`: each worker runs its calls one after another; a call submitted at virtual
  time `now` starts when its worker is free and lasts `duration(...)` (an MFC), `realloc(...)`
  (a realloc) or nothing (batch loads, frees); `wait` advances the clock to the earliest end
  and returns every call ending then. No data moves (`sends_data = False`, as in mode=local),
  so the master never submits sends; samples are metadata only (one token each).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable
from typing import Any

from realflow.api.data import SequenceSample
from realflow.api.dfg import DataflowGraph
from realflow.experiments.allocation import MeshPlan
from realflow.parallel.layout import Mesh
from realflow.system.master import Master
from realflow.system.mesh import ReallocRequest, ReallocResult
from realflow.system.transport import Transport
from realflow.system.worker import Frees, Kind, MFCRequest, MFCResult

Duration = Callable[[str, int], float]  # (MFC name, step) -> seconds of its call
ReallocDuration = Callable[[str, Mesh, Mesh], float]  # (role, src, dst) -> seconds


@dataclasses.dataclass(frozen=True)
class SimEvent:
    """One call the master made on one worker, in virtual seconds."""

    kind: str  # a Kind value: "mfc", "realloc", "fetch_batch"...
    mfc: str | None  # the MFC (for a realloc: the MFC it precedes)
    role: str | None  # a realloc's role
    step: int
    worker: int
    start: float
    end: float


class SimTransport(Transport):
    sends_data = False

    def __init__(
        self,
        duration: Duration,
        realloc: ReallocDuration,
        dataset_keys: frozenset[str],
        outputs: dict[str, tuple],
        n_seqs: int,
    ):
        self.duration = duration
        self.realloc = realloc
        self.dataset_keys = sorted(dataset_keys)
        self.outputs = outputs  # MFC name -> output keys
        self.n_seqs = n_seqs  # samples per batch (>= the largest dp: the master splits them)
        self.now = 0.0
        self.realloc_s: dict[tuple[str, str, str], float] = {}
        self.free_at: dict[int, float] = {}  # worker -> when its last queued call ends
        self.pending: list[tuple[float, int]] = []  # (end, handle)
        self.calls: dict[int, tuple[Kind, Any, int, float, float]] = {}
        self.events: list[SimEvent] = []
        self._ids = itertools.count()
        self._sample = itertools.count()

    def start(self, specs: list) -> None:  # pragma: no cover - the master never calls it
        pass

    def shutdown(self, wait: bool = True) -> None:  # pragma: no cover
        pass

    def submit(self, worker: int, kind: Kind, payload: Any = None, frees: Frees = ()) -> int:
        d = 0.0
        if kind == Kind.MFC:
            d = self.duration(payload.mfc, payload.step)
        elif kind == Kind.REALLOC:  # one request per worker of both meshes: time it once
            req: ReallocRequest = payload
            key = (req.role, req.src, req.dst)
            if key not in self.realloc_s:
                self.realloc_s[key] = self.realloc(
                    req.role, Mesh.parse(req.src), Mesh.parse(req.dst)
                )
            d = self.realloc_s[key]
        start = max(self.now, self.free_at.get(worker, 0.0))
        self.free_at[worker] = start + d
        h = next(self._ids)
        self.calls[h] = (kind, payload, worker, start, start + d)
        heapq.heappush(self.pending, (start + d, h))
        return h

    def wait(self, handles: list[int], timeout: float | None) -> list[int]:
        live = set(handles)
        while self.pending and self.pending[0][1] not in live:
            heapq.heappop(self.pending)  # already collected
        if not self.pending:
            return []
        self.now = max(self.now, self.pending[0][0])
        done = []
        while self.pending and self.pending[0][0] <= self.now:
            _, h = heapq.heappop(self.pending)
            if h in live:
                done.append(h)
        return done

    def result(self, handle: int) -> Any:
        kind, payload, worker, start, end = self.calls.pop(handle)
        if kind == Kind.MFC:
            req: MFCRequest = payload
            self.events.append(SimEvent("mfc", req.mfc, None, req.step, worker, start, end))
            meta = _meta(req.ids, self.outputs[req.mfc])
            return MFCResult(req.mfc, req.step, worker, meta, {}, start, end)
        if kind == Kind.REALLOC:
            r: ReallocRequest = payload
            self.events.append(SimEvent("realloc", None, r.role, r.step, worker, start, end))
            return ReallocResult(r, worker, start, end, sent_bytes=0, recv_bytes=0, local_bytes=0)
        if kind != Kind.FREE:
            self.events.append(SimEvent(kind.value, None, None, -1, worker, start, end))
        if kind == Kind.FETCH_BATCH:
            ids = [next(self._sample) for _ in range(self.n_seqs)]
            return _meta(ids, self.dataset_keys)
        return None


def _meta(ids: list[Any], keys: Any) -> SequenceSample | None:
    keys = list(keys)
    if not keys:
        return None
    return SequenceSample(ids=ids, seqlens={k: [[1]] * len(ids) for k in keys})


def mesh_plan(dfg: DataflowGraph, meshes: dict[str, Mesh]) -> MeshPlan:
    """The MeshPlan the runtime builds for allocation `{mfc: str(mesh)}`."""
    return MeshPlan(
        meshes=dict(meshes),
        roles={m.name: m.model_name for m in dfg.mfcs},
        train_mesh={m.model_name: meshes[m.name] for m in dfg.mfcs if m.is_train},
    )


def run_master(
    dfg: DataflowGraph,
    meshes: dict[str, Mesh],
    duration: Duration,
    realloc: ReallocDuration,
    n_steps: int,
) -> list[SimEvent]:
    """Run the real master for `n_steps` steps with MFC `name` on `meshes[name]` (every MFC
    has one, as in a mesh allocation; worker = device) taking `duration(name, step)` seconds,
    and a realloc of `role` from mesh src to mesh dst taking `realloc(role, src, dst)` on
    every worker of both. Returns the calls the master made, one event per worker."""
    plan = mesh_plan(dfg, meshes)
    data_worker = meshes[dfg.sources()[0]].workers[0]  # as realflow.system.runner places it
    placement = {m.model_name: meshes[m.name].workers[0] for m in reversed(dfg.mfcs)}
    transport = SimTransport(
        duration,
        realloc,
        dfg.dataset_keys,
        {m.name: m.output_keys for m in dfg.mfcs},
        n_seqs=max(m.layout.dp for m in meshes.values()),
    )
    master = Master(dfg, transport, placement, data_worker, mesh_plan=plan)
    master.run(1, n_steps, lambda step, stats, s: None, lambda step: False, lambda step: None)
    return transport.events
