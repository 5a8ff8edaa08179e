"""The simulator's only contact with realflow.system.master: the real `Master` driven by a
transport whose calls take simulated time on a virtual clock.

`run_master(...)` runs the real master's loop (readiness, the parameter-version rule, steps in
flight, frees, weight copies) over `n_steps` steps. What it changes, and nothing else:

- `SimTransport`: a call submitted at virtual time `now` ends at `now + duration(...)`;
  `wait` advances the clock to the earliest end and returns every call ending then. No data
  moves (`sends_data = False`, as in mode=local).
- `_MeshMaster.worker_of` / `_idle`: the master of this branch places an MFC on one worker
  per role; here an MFC occupies a set of devices, so each distinct device set is one virtual
  worker, and a virtual worker is idle when no running call holds any of its devices.

When the master learns to run an MFC on a mesh and to insert realloc steps (branch sysmesh),
this file is the one to adapt: drop the two overrides, give `duration` the realloc calls the
master submits, and pass the plan's meshes as the master's allocation.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable
from typing import Any

from realflow.api.data import SequenceSample
from realflow.api.dfg import DataflowGraph, MFCDef
from realflow.system.master import Master
from realflow.system.transport import Transport
from realflow.system.worker import Frees, Kind, MFCRequest, MFCResult

# (mfc name, step, virtual worker) -> seconds the call takes
Duration = Callable[[str, int, int], float]


@dataclasses.dataclass(frozen=True)
class SimEvent:
    """One call the master made, in virtual seconds."""

    kind: str  # a Kind value: "mfc", "fetch_batch", "set_weights"...
    mfc: str | None
    step: int
    worker: int  # virtual worker
    start: float
    end: float


class SimTransport(Transport):
    sends_data = False

    def __init__(self, duration: Duration, dataset_keys: frozenset[str], outputs: dict[str, tuple]):
        self.duration = duration
        self.dataset_keys = sorted(dataset_keys)
        self.outputs = outputs  # MFC name -> output keys
        self.now = 0.0
        self.pending: list[tuple[float, int]] = []  # (end, handle)
        self.calls: dict[int, tuple[Kind, Any, int, float, float]] = {}
        self.events: list[SimEvent] = []
        self.n_seqs = 1
        self.versions: dict[str, int] = {}
        self._ids = itertools.count()
        self._sample = itertools.count()

    def start(self, specs: list) -> None:  # pragma: no cover - the master never calls it
        pass

    def shutdown(self, wait: bool = True) -> None:  # pragma: no cover
        pass

    def submit(self, worker: int, kind: Kind, payload: Any = None, frees: Frees = ()) -> int:
        d = 0.0
        if kind == Kind.MFC:
            d = self.duration(payload.mfc, payload.step, worker)
        h = next(self._ids)
        self.calls[h] = (kind, payload, worker, self.now, self.now + d)
        heapq.heappush(self.pending, (self.now + d, h))
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
        step = payload.step if kind == Kind.MFC else -1
        mfc = payload.mfc if kind == Kind.MFC else None
        if kind != Kind.FREE:
            self.events.append(SimEvent(kind.value, mfc, step, worker, start, end))
        if kind == Kind.FETCH_BATCH:
            ids = [next(self._sample) for _ in range(self.n_seqs)]
            return _meta(ids, self.dataset_keys)
        if kind == Kind.MFC:
            req: MFCRequest = payload
            return MFCResult(
                req.mfc, req.step, worker, _meta(req.ids, self.outputs[req.mfc]), {},
                start, end,
            )  # fmt: skip
        if kind == Kind.GET_WEIGHTS:
            return (0, None)
        return None


def _meta(ids: list[Any], keys: Any) -> SequenceSample | None:
    keys = list(keys)
    if not keys:
        return None
    return SequenceSample(ids=ids, seqlens={k: [[1]] * len(ids) for k in keys})


class _MeshMaster(Master):
    """The real Master; an MFC's worker is the virtual worker of its device set."""

    def __init__(self, *args: Any, group_of: dict[str, int], overlaps: dict[int, set[int]],
                 **kwargs: Any):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.group_of = group_of
        self.overlaps = overlaps

    def worker_of(self, mfc: MFCDef) -> int:
        return self.group_of[mfc.name]

    def _idle(self, worker: int) -> bool:
        return all(self.busy[g] == 0 for g in self.overlaps[worker])


def run_master(
    dfg: DataflowGraph,
    devices_of: dict[str, frozenset[int]],
    duration: Callable[[str, int], float],
    n_steps: int,
    weight_copies: dict[str, str] | None = None,
    max_staleness: int = 0,
) -> tuple[list[SimEvent], dict[int, frozenset[int]]]:
    """Run the real master for `n_steps` steps with MFC `name` of step `s` on devices
    `devices_of[name]` (empty: a worker of its own, e.g. a rule-based scorer) taking
    `duration(name, s)` seconds. Returns the calls it made and each virtual worker's devices."""
    sets: dict[frozenset[int], int] = {}
    group_of: dict[str, int] = {}
    for m in dfg.mfcs:
        devs = devices_of[m.name] or frozenset({-1 - len(sets)})  # a private worker
        group_of[m.name] = sets.setdefault(devs, len(sets))
    data_worker = len(sets)
    groups = {g: d for d, g in sets.items()} | {data_worker: frozenset({-(10**9)})}
    overlaps = {g: {h for h, e in groups.items() if d & e} for g, d in groups.items()}
    placement = {m.model_name: group_of[m.name] for m in reversed(dfg.mfcs)}
    transport = SimTransport(
        lambda name, step, worker: duration(name, step),
        dfg.dataset_keys,
        {m.name: m.output_keys for m in dfg.mfcs},
    )
    transport.n_seqs = 1  # the master reads ids, not their number: one sample stands for the batch
    master = _MeshMaster(
        dfg, transport, placement, data_worker, group_of=group_of, overlaps=overlaps,
        weight_copies=weight_copies, max_staleness=max_staleness,
    )  # fmt: skip
    master.run(1, n_steps, lambda step, stats, s: None, lambda step: False, lambda step: None)
    return transport.events, groups
