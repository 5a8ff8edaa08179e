"""The search's fast step-time estimate: list scheduling of a few steps under the master's
rules, in plain Python over integer device masks.

The rules are those of realflow.system.master (see its docstring), restated for speed: an MFC
of step t starts when its inputs of step t exist, the parameter-version rule allows it (a call
on a trained model waits for that model's train_step of step t-1; a train_step waits for every
other call on its model at step t), every device of its mesh is idle, and at most 2 steps are
in flight; ready MFCs are dispatched in (step, DFG order). Realloc before a call on a trained
model's other placement is part of that call. The simulator (simulate.py) drives the real
Master with the same durations; tests/search/test_simulate.py checks the two agree.
"""

from __future__ import annotations

import heapq

from realflow.search.plan import Plan, Problem


def durations(problem: Problem, plan: Plan) -> list[float]:
    """Seconds of each task's call, including the realloc that precedes it."""
    out = []
    for t in problem.tasks:
        p = plan[t.name]
        d = problem.time(t.name, p)
        if t.kind != "train_step" and t.role in problem.trainer:
            d += problem.realloc_time(t.role, plan[problem.trainer[t.role]], p)
        out.append(d)
    return out


def _static(problem: Problem) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """Per task: the tasks it reads from, its role's trainer (-1: none), and for a train_step
    the other calls on its model (computed once per problem)."""
    cached = getattr(problem, "_schedule_static", None)
    if cached is None:
        tasks = problem.tasks
        index = {t.name: i for i, t in enumerate(tasks)}
        deps = [[index[d] for d in t.deps] for t in tasks]
        trainer = [index.get(problem.trainer.get(t.role, ""), -1) for t in tasks]
        peers = [
            [j for j, u in enumerate(tasks) if u.role == t.role and u.kind != "train_step"]
            if t.kind == "train_step"
            else []
            for t in tasks
        ]
        cached = problem._schedule_static = (deps, trainer, peers)  # type: ignore[attr-defined]
    return cached


def schedule(problem: Problem, plan: Plan, n_steps: int = 3) -> list[list[tuple[float, float]]]:
    """(start, end) of every task of steps 1..n_steps (index 0..n_steps-1)."""
    tasks = problem.tasks
    k = len(tasks)
    dur = durations(problem, plan)
    mask = [plan[t.name].mask if t.model is not None else 0 for t in tasks]
    deps, trainer, peers = _static(problem)
    times: list[list[tuple[float, float]]] = [[(-1.0, -1.0)] * k for _ in range(n_steps)]
    done = [[False] * k for _ in range(n_steps)]
    pending = [list(range(k)) for _ in range(n_steps)]  # not launched yet, in DFG order
    n_done = [0] * n_steps
    running: list[tuple[float, int, int]] = []
    busy, now = 0, 0.0
    while True:
        for s in range(n_steps):
            if s >= 2 and n_done[s - 2] < k:
                break  # at most two steps in flight
            ds, prev = done[s], done[s - 1] if s > 0 else None
            left = []
            for i in pending[s]:
                tr = trainer[i]
                if (
                    mask[i] & busy
                    or any(not ds[j] for j in deps[i])
                    or (prev is not None and tr >= 0 and not prev[tr])
                    or any(not ds[j] for j in peers[i])
                ):
                    left.append(i)
                    continue
                busy |= mask[i]
                times[s][i] = (now, now + dur[i])
                heapq.heappush(running, (now + dur[i], s, i))
            pending[s] = left
        if not running:
            return times
        now = running[0][0]
        while running and running[0][0] == now:
            _, s, i = heapq.heappop(running)
            done[s][i] = True
            n_done[s] += 1
            busy &= ~mask[i]


def step_ends(times: list[list[tuple[float, float]]]) -> list[float]:
    return [max(end for _, end in step) for step in times]


def step_time(problem: Problem, plan: Plan, n_steps: int = 3) -> float:
    """The steady-state step period: mean time between the ends of consecutive steps after the
    first."""
    ends = step_ends(schedule(problem, plan, n_steps))
    if n_steps == 1:
        return ends[0]
    return (ends[-1] - ends[0]) / (n_steps - 1)
