"""Search over device meshes and layouts for every MFC, with memory constraints, and the
baselines users write by hand.

Algorithm: best-response descent + MCMC (Metropolis), both over the same candidates.
- Candidates of an MFC: every device range of `Problem.ranges()` (aligned blocks within a
  node, runs of whole nodes) times the layouts of that range size that fit its own memory and
  are worth trying: the `keep` fastest, and every one that needs less memory than all faster
  ones (what the other MFCs on those devices leave may be little), and the placements the
  baselines use. Position does not change a call's time,
  only what it shares devices with.
- Descent: from each start (the baselines, everything on the whole cluster, and `restarts`
  random plans: a mesh allocation's realloc and batch loads make narrow basins), replace one
  MFC's placement by its best candidate given the others (every candidate tried), MFC after MFC,
  until a sweep improves nothing. This is exact coordinate search: it finds what MCMC finds by
  sampling, without the sampling.
- MCMC: from the best plan, moves accepted by the Metropolis rule (temperature relative to the
  current step time, cooled geometrically), as ReaL does, until the time budget or iteration
  cap; the best plan seen wins. A move is a random new placement for one MFC (35%), the best
  response of one MFC (25%), or a random placement for one MFC followed by the best response
  of another (40%): the last escapes the local optima of descent, where two MFCs must move
  together (e.g. both train steps off a shared mesh at once).

Every plan is scored by `estimate.step_time` (the master's rules by list scheduling; tests check
it equals the simulation through the real master); plans that do not fit memory are rejected.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time

from realflow.parallel.layout import Layout
from realflow.search import cost
from realflow.search.estimate import step_time
from realflow.search.plan import Placement, Plan, Problem

INF = float("inf")


@dataclasses.dataclass
class SearchResult:
    name: str
    plan: Plan
    step_time_s: float  # INF when no plan fits
    evaluations: int = 0
    seconds: float = 0.0
    found_at_s: float = 0.0  # when the search first reached this plan's step time
    cpu_s: float = 0.0  # CPU time of this process during the search (a shared machine's wall
    # clock counts other processes' time too)


def score(problem: Problem, plan: Plan, n_steps: int = 3) -> float:
    """Estimated step time, INF when the plan does not fit in memory."""
    if not problem.fits(plan):
        return INF
    return step_time(problem, plan, n_steps)


def _own_bytes(problem: Problem, name: str, p: Placement) -> float:
    """The least MFC `name` needs on each device of `p`, whatever else runs there: a train_step
    keeps its role's training state at home on `p`; any other call of a trained role holds only
    a weight copy in the compute dtype there (its training state lives on the train_step's
    devices), and an untrained role's weights are that copy."""
    task = problem.by_name[name]
    if problem.trainer.get(task.role) == name:
        return problem.resident_bytes(task.role, p) + problem.working_bytes(name, p, True)
    return problem.working_bytes(name, p, False)


def _pinned(problem: Problem) -> Plan:
    """Weightless MFCs (rule-based scorers) cost nothing; they are not searched."""
    return {t.name: Placement(Layout(), 0) for t in problem.tasks if t.model is None}


def searched(problem: Problem) -> list[str]:
    return [t.name for t in problem.tasks if t.model is not None]


def candidates(problem: Problem, name: str, keep: int = 3) -> list[Placement]:
    """The placements worth trying for MFC `name` (see the module docstring)."""
    limit = problem.dev.memory * cost.USABLE_MEMORY
    best_layouts: dict[tuple[int, bool], list[Layout]] = {}
    out = []
    for lo, n in problem.ranges():
        key = (n, problem._spans_nodes(Placement(Layout(n), lo)))
        if key not in best_layouts:
            fitting = []
            for lay in problem.layouts(name, n):
                p = Placement(lay, lo)
                own = _own_bytes(problem, name, p)
                if own <= limit:
                    fitting.append((problem.time(name, p), str(lay), own, lay))
            chosen, leanest = [], math.inf
            for i, (_, _, own, lay) in enumerate(sorted(fitting)):
                if i < keep or own < leanest:  # the fastest, and each leaner than all faster
                    chosen.append(lay)
                leanest = min(leanest, own)
            best_layouts[key] = chosen
        out.extend(Placement(lay, lo) for lay in best_layouts[key])
    return out


# ---- baselines -------------------------------------------------------------------------------------


def colocated(problem: Problem) -> SearchResult:
    """Every MFC on every device in one layout (the best one that fits)."""
    n = problem.cluster.n_devices
    names = searched(problem)
    layouts = set(problem.layouts(names[0], n)) if names else set()
    for name in names[1:]:
        layouts &= set(problem.layouts(name, n))
    best = SearchResult("colocated, one layout", {}, INF)
    for lay in sorted(layouts, key=str):
        plan = {**_pinned(problem), **{m: Placement(lay, 0) for m in names}}
        s = score(problem, plan)
        best.evaluations += 1
        if s < best.step_time_s:
            best.plan, best.step_time_s = plan, s
    return best


def split_halves(problem: Problem) -> SearchResult:
    """Generation on the first half of the devices, every other MFC on the second half; the
    best layout for each half."""
    n = problem.cluster.n_devices
    best = SearchResult("generation / rest on disjoint halves", {}, INF)
    gen = [t.name for t in problem.tasks if t.kind == "generate" and t.model is not None]
    rest = [m for m in searched(problem) if m not in gen]
    if n < 2 or not gen or not rest:
        return best
    half = n // 2
    gen_layouts = _common_layouts(problem, gen, half)
    rest_layouts = _common_layouts(problem, rest, n - half)
    for a in gen_layouts:
        for b in rest_layouts:
            plan = {**_pinned(problem), **{m: Placement(a, 0) for m in gen}}
            plan.update({m: Placement(b, half) for m in rest})
            s = score(problem, plan)
            best.evaluations += 1
            if s < best.step_time_s:
                best.plan, best.step_time_s = plan, s
    return best


def _common_layouts(problem: Problem, names: list[str], n: int) -> list[Layout]:
    common = set(problem.layouts(names[0], n))
    for m in names[1:]:
        common &= set(problem.layouts(m, n))
    return sorted(common, key=str)


def real_heuristic(problem: Problem) -> SearchResult:
    """ReaL-style heuristic: every MFC on the whole cluster, each in the most data-parallel
    layout that fits memory with the others (model parallelism grown tp first, within a node,
    then pp; generation keeps pp = 1 when it can). The training copies are placed first, with
    at least `m` model-parallel devices, m = 1, 2, 4...: the first m whose plan fits wins."""
    n = problem.cluster.n_devices
    # the training copies first: they stay resident, the other calls must fit around them
    names = sorted(searched(problem), key=lambda m: problem.by_name[m].kind != "train_step")

    def order(name: str) -> list[Layout]:
        gen = problem.by_name[name].kind == "generate"
        return sorted(problem.layouts(name, n),
                      key=lambda lay: (lay.tp * lay.pp, lay.pp * (1000 if gen else 1), lay.tp))  # fmt: skip

    m = 1
    while m <= n:
        plan = _pinned(problem)
        for name in names:
            floor = m if problem.by_name[name].kind == "train_step" else 1
            options = [lay for lay in order(name) if lay.tp * lay.pp >= floor]
            for lay in options:  # the first that fits with what is placed so far
                plan[name] = Placement(lay, 0)
                if _fits_partial(problem, plan):
                    break
        if len(plan) == len(problem.tasks) and problem.fits(plan):
            return SearchResult("ReaL heuristic", plan, score(problem, plan), m)
        m *= 2
    return SearchResult("ReaL heuristic", {}, INF, m)


def _fits_partial(problem: Problem, plan: Plan) -> bool:
    """Memory check of a plan that places some MFCs only (the others are not counted)."""
    full = dict(plan)
    sub = Problem([t for t in problem.tasks if t.name in full], problem.cluster)
    return sub.fits(full)


def baselines(problem: Problem) -> list[SearchResult]:
    return [colocated(problem), split_halves(problem), real_heuristic(problem)]


# ---- the search ------------------------------------------------------------------------------------


def search(
    problem: Problem,
    budget_s: float = 30.0,
    seed: int = 0,
    max_iters: int = 20000,
    keep: int = 3,
    restarts: int = 4,
) -> SearchResult:
    """The best plan found (see the module docstring) within `budget_s` seconds or `max_iters`
    MCMC moves, whichever comes first."""
    t0, c0 = time.perf_counter(), time.process_time()
    rng = random.Random(seed)
    names = searched(problem)
    cands = {m: candidates(problem, m, keep) for m in names}
    empty = [m for m, c in cands.items() if not c]
    result = SearchResult("search (descent + MCMC)", {}, INF)
    if empty:
        result.seconds = time.perf_counter() - t0
        return result  # some MFC fits nowhere on its own
    starts = [b.plan for b in baselines(problem) if b.step_time_s < INF]
    for start in starts:  # the baselines' placements are candidates too (e.g. half a node)
        for m in names:
            if start[m] not in cands[m]:
                cands[m].append(start[m])
    whole = problem.cluster.n_devices
    starts.append({**_pinned(problem), **{m: _best_of(cands[m], whole) for m in names}})
    evals = 0

    def evaluate(plan: Plan) -> float:
        nonlocal evals
        evals += 1
        return score(problem, plan)

    deadline = t0 + budget_s
    for start in starts:
        if time.perf_counter() > deadline:
            break
        plan, s = _descend(dict(start), evaluate(start), cands, names, evaluate, deadline)
        if s < result.step_time_s:
            result.plan, result.step_time_s = dict(plan), s
            result.found_at_s = time.perf_counter() - t0
    for _ in range(restarts):  # descents from random plans: other basins than the baselines'
        if time.perf_counter() > deadline:
            break
        start = {**_pinned(problem), **{m: rng.choice(cands[m]) for m in names}}
        plan, s = _descend(start, evaluate(start), cands, names, evaluate, deadline)
        if s < result.step_time_s:
            result.plan, result.step_time_s = dict(plan), s
            result.found_at_s = time.perf_counter() - t0
    if result.step_time_s < INF:
        _mcmc(problem, result, cands, names, evaluate, rng, t0, budget_s, max_iters)
    result.evaluations = evals
    result.seconds = time.perf_counter() - t0
    result.cpu_s = time.process_time() - c0
    return result


def _best_of(cands: list[Placement], n: int) -> Placement:
    whole = [p for p in cands if p.n == n]
    return whole[0] if whole else cands[-1]


def _best_response(
    plan: Plan, name: str, cands: list[Placement], evaluate
) -> tuple[Placement, float]:
    best, best_s = plan[name], INF
    for p in cands:
        plan[name] = p
        s = evaluate(plan)
        if s < best_s:
            best, best_s = p, s
    plan[name] = best
    return best, best_s


def _descend(plan, s, cands, names, evaluate, deadline) -> tuple[Plan, float]:
    """Best responses MFC after MFC until a sweep improves nothing; then the split moves, and
    sweeps again after one that improves."""
    improved = True
    while improved:
        improved = False
        for name in names:
            if time.perf_counter() > deadline:
                return plan, s
            before = plan[name]
            _, new = _best_response(plan, name, cands[name], evaluate)
            if new < s - 1e-12:
                s, improved = new, True
            else:
                plan[name] = before
        if not improved:
            moved, new = _best_split(plan, cands, names, evaluate)
            if new < s - 1e-12:
                plan.update(moved)
                s, improved = new, True
    return plan, s


SPLIT_LAYOUTS = 3  # layouts tried per half in a split move (the fastest candidates there)


def _best_split(plan, cands, names, evaluate) -> tuple[Plan, float]:
    """The best "split" of two MFCs that share a placement's devices: one on the first half of
    them, the other on the second, each in one of its `SPLIT_LAYOUTS` fastest candidates there.
    One best response cannot reach it (moving either alone only crowds the other), e.g. both
    train steps leaving a shared mesh to train side by side."""
    best: tuple[Plan, float] = ({}, INF)
    for a in names:
        for b in names:
            p = plan[a]
            if a == b or plan[b].lo != p.lo or plan[b].n != p.n or p.n < 2 or p.n % 2:
                continue
            half = p.n // 2
            first = [c for c in cands[a] if c.lo == p.lo and c.n == half][:SPLIT_LAYOUTS]
            second = [c for c in cands[b] if c.lo == p.lo + half and c.n == half][:SPLIT_LAYOUTS]
            for pa in first:
                for pb in second:
                    trial = {**plan, a: pa, b: pb}
                    t = evaluate(trial)
                    if t < best[1]:
                        best = ({a: pa, b: pb}, t)
    return best


def _mcmc(problem, result, cands, names, evaluate, rng, t0, budget_s, max_iters) -> None:
    """Metropolis over single- and two-MFC moves (see the module docstring)."""
    plan, s = dict(result.plan), result.step_time_s
    temp = 0.05
    for it in range(max_iters):
        if time.perf_counter() > t0 + budget_s:
            break
        name = rng.choice(names)
        old = dict(plan)
        u = rng.random()
        plan[name] = rng.choice(cands[name])
        if u < 0.25:  # best response of one MFC
            plan[name] = old[name]
            _, new = _best_response(plan, name, cands[name], evaluate)
        elif u < 0.6 or len(names) == 1:  # a random move of one MFC
            new = evaluate(plan)
        else:  # a random move of one MFC and the best response of another to it
            other = rng.choice([m for m in names if m != name])
            _, new = _best_response(plan, other, cands[other], evaluate)
        if new < s or (new < INF and rng.random() < math.exp(-(new - s) / (temp * s))):
            s = new
            if s < result.step_time_s - 1e-12:
                result.plan, result.step_time_s = dict(plan), s
                result.found_at_s = time.perf_counter() - t0
        else:
            plan = old
        if it % 100 == 99:
            temp *= 0.9
