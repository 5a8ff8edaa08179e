"""The simulator: a plan run by the real master (through master_adapter) with the cost model's
durations. Output: step time, per-device timeline (trace.json in the runtime's format, opens in
Perfetto), utilisation and peak memory per device."""

from __future__ import annotations

import dataclasses

from realflow.api.dfg import DataflowGraph
from realflow.search import cost
from realflow.search.estimate import durations
from realflow.search.master_adapter import SimEvent, run_master
from realflow.search.plan import Plan, Problem
from realflow.system.observe import Tracer
from realflow.system.worker import MFCResult


@dataclasses.dataclass
class DeviceEvent:
    """One interval a device spent on a call (`realloc <role>` for the weights' move before a
    call on another placement of a trained role)."""

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


def simulate(
    problem: Problem,
    plan: Plan,
    dfg: DataflowGraph,
    n_steps: int = 4,
    weight_copies: dict[str, str] | None = None,
    max_staleness: int = 0,
) -> SimResult:
    """Run `n_steps` steps of `dfg` under `plan` through the real master."""
    dur = dict(zip([t.name for t in problem.tasks], durations(problem, plan), strict=True))
    devices_of = {
        t.name: frozenset(plan[t.name].workers) if t.model is not None else frozenset()
        for t in problem.tasks
    }
    calls, _ = run_master(
        dfg, devices_of, lambda name, step: dur[name], n_steps, weight_copies, max_staleness
    )
    mfc_calls = [c for c in calls if c.kind == "mfc"]
    events = _device_events(problem, plan, mfc_calls)
    ends: dict[int, float] = {}
    for c in mfc_calls:
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


def _device_events(problem: Problem, plan: Plan, calls: list[SimEvent]) -> list[DeviceEvent]:
    out = []
    for c in calls:
        assert c.mfc is not None
        t = problem.by_name[c.mfc]
        if t.model is None:
            continue
        p = plan[c.mfc]
        realloc_s = 0.0
        if t.kind != "train_step" and t.role in problem.trainer:
            realloc_s = problem.realloc_time(t.role, plan[problem.trainer[t.role]], p)
        realloc_end = c.start + realloc_s
        for d in p.workers:
            if realloc_s > 0:
                out.append(DeviceEvent(f"realloc {t.role}", c.step, d, c.start, realloc_end))
            out.append(DeviceEvent(c.mfc, c.step, d, realloc_end, c.end))
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
