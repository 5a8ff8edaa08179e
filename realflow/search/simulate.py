"""The simulator: a plan run by the real master (through master_adapter) with the cost model's
durations. Output: step time, per-device timeline (trace.json in the runtime's format, opens in
Perfetto), utilisation and peak memory per device."""

from __future__ import annotations

import dataclasses

from realflow.api.dfg import DataflowGraph
from realflow.parallel.layout import Mesh
from realflow.search import cost
from realflow.search.master_adapter import SimEvent, run_master
from realflow.search.plan import Placement, Plan, Problem
from realflow.system.observe import Tracer
from realflow.system.worker import MFCResult


@dataclasses.dataclass
class DeviceEvent:
    """One interval a device spent on a call (`realloc <role>`: the weights' move from a trained
    role's training mesh to another of its meshes, on the devices of both)."""

    name: str
    step: int
    device: int
    start: float
    end: float


@dataclasses.dataclass
class SimResult:
    step_time_s: float  # steady-state period (mean over steps after the first)
    step_ends: list[float]
    events: list[DeviceEvent]
    utilisation: dict[int, float]  # busy fraction of each device after the first step
    peak_memory: dict[int, float]  # bytes
    memory_limit: float

    @property
    def oom_devices(self) -> list[int]:
        return sorted(d for d, b in self.peak_memory.items() if b > self.memory_limit)


def simulate(problem: Problem, plan: Plan, dfg: DataflowGraph, n_steps: int = 4) -> SimResult:
    """Run `n_steps` steps of `dfg` under `plan` through the real master: every MFC on its
    placement's mesh, the cost model's call and realloc times."""
    meshes = {t.name: plan[t.name].mesh for t in problem.tasks}
    calls = run_master(
        dfg,
        meshes,
        lambda name, step: problem.time(name, plan[name]),
        lambda role, src, dst: problem.realloc_time(role, _placement(src), _placement(dst)),
        n_steps,
    )
    events = _device_events(problem, calls)
    ends: dict[int, float] = {}
    for c in calls:
        if c.kind == "mfc":
            ends[c.step] = max(ends.get(c.step, 0.0), c.end)
    step_ends = [ends[s] for s in sorted(ends)]
    period = (
        (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
        if len(step_ends) > 1
        else (step_ends[0])
    )
    return SimResult(
        step_time_s=period,
        step_ends=step_ends,
        events=events,
        utilisation=_utilisation(events, step_ends, problem.cluster.n_devices),
        peak_memory=problem.peak_memory(plan),
        memory_limit=problem.dev.memory * cost.USABLE_MEMORY,
    )


def _placement(mesh: Mesh) -> Placement:
    return Placement(mesh.layout, mesh.workers[0])


def _device_events(problem: Problem, calls: list[SimEvent]) -> list[DeviceEvent]:
    """The MFC and realloc calls of the MFCs with weights (a weightless one is free)."""
    out = []
    for c in calls:
        if c.kind == "realloc":
            out.append(DeviceEvent(f"realloc {c.role}", c.step, c.worker, c.start, c.end))
        elif c.kind == "mfc" and problem.by_name[c.mfc or ""].model is not None:
            out.append(DeviceEvent(c.mfc or "", c.step, c.worker, c.start, c.end))
    return sorted(out, key=lambda e: (e.start, e.device))


def _utilisation(events: list[DeviceEvent], ends: list[float], n: int) -> dict[int, float]:
    lo, hi = (ends[0], ends[-1]) if len(ends) > 1 else (0.0, ends[0])
    busy = dict.fromkeys(range(n), 0.0)
    for e in events:
        busy[e.device] += max(0.0, min(e.end, hi) - max(e.start, lo))
    return {d: (b / (hi - lo) if hi > lo else 0.0) for d, b in busy.items()}


def write_trace(result: SimResult, path: str, n_devices: int) -> None:
    """trace.json with the runtime's Tracer: one track per device, one event per call."""
    tracer = Tracer(path, {d: f"device {d}" for d in range(n_devices)})
    tracer.t0 = 0.0  # virtual seconds from the start of the run
    for e in result.events:
        tracer.record(MFCResult(e.name, e.step, e.device, None, {}, e.start, e.end), 0)
    tracer.write()
