"""The search's fast step-time estimate: list scheduling of a few steps under the master's
rules, in plain Python over integer device masks.

The rules are those of realflow.system.master with a mesh allocation (its docstring and
mesh_dispatch.py), restated for speed: the data task's first device loads each step's batch
(at most 2 steps in flight); an MFC of step t starts when its inputs of step t exist, the
parameter-version rule allows it (a call on a trained model waits for that model's train_step
of step t-1; a train_step waits for every other call on its model at step t) and every device
it needs is idle; ready MFCs are dispatched in (step, DFG order). A call on a trained role's
other placement first reallocates the weights when that placement holds an older version (from
step 2 on, once per step and placement): the realloc occupies the devices of both placements,
and the call follows it on its own. The simulator (simulate.py) drives the real Master with the
same durations; tests/search/test_simulate.py checks the two agree.
"""

from __future__ import annotations

import heapq

from realflow.search.plan import Plan, Problem


def _static(problem: Problem) -> tuple[list[list[int]], list[int], list[list[int]], int]:
    """Per task: the tasks it reads from, its role's trainer (-1: none), and for a train_step
    the other calls on its model; and the data task (the first that reads only dataset keys,
    whose mesh's first device loads the batches). Computed once per problem."""
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
        source = next(i for i, t in enumerate(tasks) if not t.deps)
        cached = problem._schedule_static = (deps, trainer, peers, source)  # type: ignore[attr-defined]
    return cached


def _reallocs(problem: Problem, plan: Plan) -> list[tuple[float, int] | None]:
    """Per task: (seconds, training mesh's device mask) of the realloc that fills its mesh
    with its role's latest weights, when its role is trained on another placement."""
    out: list[tuple[float, int] | None] = []
    for t in problem.tasks:
        train = problem.trainer.get(t.role)
        src = plan[train] if train is not None else None
        if src is None or src == plan[t.name]:
            out.append(None)
        else:
            out.append((problem.realloc_time(t.role, src, plan[t.name]), src.mask))
    return out


FETCH, MFC, REALLOC = 0, 1, 2


def schedule(problem: Problem, plan: Plan, n_steps: int = 3) -> list[list[tuple[float, float]]]:
    """(start, end) of every task's call of steps 1..n_steps (index 0..n_steps-1), its realloc
    excluded. One pass of the loop is one pass of `Master.run`: retire finished steps, load
    the next batch, dispatch, collect every call that ends first."""
    tasks = problem.tasks
    k = len(tasks)
    dur = [problem.time(t.name, plan[t.name]) for t in tasks]
    mask = [plan[t.name].mask for t in tasks]
    realloc = _reallocs(problem, plan)
    copy = [(t.role, plan[t.name]) for t in tasks]
    copy_at: dict[tuple[str, object], int] = {}  # (role, placement) -> step of its weights
    deps, trainer, peers, source = _static(problem)
    data = 1 << plan[tasks[source].name].lo
    times: list[list[tuple[float, float]]] = [[(-1.0, -1.0)] * k for _ in range(n_steps)]
    done = [[False] * k for _ in range(n_steps)]
    pending = [list(range(k)) for _ in range(n_steps)]  # not launched yet, in DFG order
    n_done = [0] * n_steps
    loaded = [False] * n_steps
    in_flight: list[int] = []
    # (end, seq, what, step, task, devices it frees)
    running: list[tuple[float, int, int, int, int, int]] = []
    seq = busy = next_fetch = 0
    now = 0.0
    while True:
        in_flight = [s for s in in_flight if n_done[s] < k]
        if (
            next_fetch < n_steps
            and (not in_flight or next_fetch <= in_flight[0] + 1)
            and not busy & data
        ):
            in_flight.append(next_fetch)
            busy |= data
            heapq.heappush(running, (now, seq := seq + 1, FETCH, next_fetch, -1, data))
            next_fetch += 1
        for s in in_flight:
            if not loaded[s] or not pending[s]:
                continue
            ds = done[s]
            prev = done[s - 1] if s - 1 in in_flight else None
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
                r = realloc[i]
                start = now
                if r is not None and copy_at.get(copy[i], 0) < s:  # due: the mesh is behind
                    if r[1] & busy:
                        left.append(i)
                        continue
                    start = now + r[0]
                    copy_at[copy[i]] = s
                    frees = r[1] & ~mask[i]  # the training mesh; the call keeps its own
                    busy |= r[1]
                    heapq.heappush(running, (start, seq := seq + 1, REALLOC, s, i, frees))
                busy |= mask[i]
                times[s][i] = (start, start + dur[i])
                heapq.heappush(running, (start + dur[i], seq := seq + 1, MFC, s, i, mask[i]))
            pending[s] = left
        if not running:
            return times
        now = running[0][0]
        while running and running[0][0] <= now:
            _, _, what, s, i, frees = heapq.heappop(running)
            busy &= ~frees
            if what == FETCH:
                loaded[s] = True
            elif what == MFC:
                done[s][i] = True
                n_done[s] += 1


def step_ends(times: list[list[tuple[float, float]]]) -> list[float]:
    return [max(end for _, end in step) for step in times]


def step_time(problem: Problem, plan: Plan, n_steps: int = 3) -> float:
    """The steady-state step period: mean time between the ends of consecutive steps after the
    first."""
    ends = step_ends(schedule(problem, plan, n_steps))
    if n_steps == 1:
        return ends[0]
    return (ends[-1] - ends[0]) / (n_steps - 1)
