"""The search finds the known optimum: brute force on small clusters, and cases checked by hand."""

from __future__ import annotations

import dataclasses
import itertools
import time

import pytest
from conftest import DEV, SMALL, make_cluster, ppo_problem

from realflow.api.dfg import InterfaceSpec, MFCDef, build_dfg
from realflow.parallel.layout import Layout
from realflow.search import search
from realflow.search.plan import Placement, problem_from_dfg


def _brute_force(problem):
    """Every combination of every MFC's candidates and of the placements the baselines use
    (the search starts from those, so they are part of what it can reach)."""
    names = search.searched(problem)
    extra = [b.plan for b in search.baselines(problem) if b.plan]
    cands = [
        sorted({*search.candidates(problem, m, keep=100), *(p[m] for p in extra)}, key=str)
        for m in names
    ]
    best, best_plan = search.INF, None
    for combo in itertools.product(*cands):
        plan = {**search._pinned(problem), **dict(zip(names, combo, strict=True))}
        s = search.score(problem, plan)
        if s < best:
            best, best_plan = s, plan
    return best, best_plan


@pytest.mark.parametrize("per", [2, 3])
def test_search_finds_the_brute_force_optimum_of_ppo(per):
    """PPO's five MFCs with weights on 2 and 3 devices: every combination of every candidate
    (all layouts, all ranges) against the search."""
    problem, _ = ppo_problem(make_cluster(per=per), n_seqs=16)
    best, _ = _brute_force(problem)
    found = search.search(problem, budget_s=60, seed=1, max_iters=2000, keep=100)
    assert found.step_time_s == pytest.approx(best, rel=1e-9)


def _two_inferences(cluster, model=SMALL):
    mfcs = [
        MFCDef(n, n, "inference", InterfaceSpec("x"), 32, ("prompts",), (f"{n}_out",))
        for n in ("a", "b")
    ]
    dfg = build_dfg(mfcs)
    return problem_from_dfg(dfg, {"a": model, "b": model}, cluster, 64, 64)


def test_independent_calls_go_to_their_own_devices():
    """Two independent calls on 2 devices: side by side each takes t(1 device) at once; on both
    devices they take 2 * t(2 devices) one after the other, which the fixed call cost makes
    longer. The search must put them side by side."""
    problem = _two_inferences(make_cluster(per=2))
    one = problem.time("a", Placement(Layout(), 0))
    two = problem.time("a", Placement(Layout(2, 1, 1), 0))
    assert one < 2 * two  # the premise: side by side wins
    found = search.search(problem, budget_s=10, max_iters=50)
    assert found.step_time_s == pytest.approx(one)
    assert {found.plan["a"].lo, found.plan["b"].lo} == {0, 1}
    assert found.plan["a"].n == found.plan["b"].n == 1


def test_descent_splits_two_calls_off_a_shared_mesh():
    """From both calls on both devices no single move helps (one call alone on one device
    still waits for the other's), but one on each device is better: the split move of the
    descent reaches it, and it is the brute-force optimum."""
    problem = _two_inferences(make_cluster(per=2))
    cands = {m: search.candidates(problem, m) for m in ("a", "b")}
    both = Placement(Layout(2, 1, 1), 0)
    start = {"a": both, "b": both}
    s0 = search.score(problem, start)
    for m in ("a", "b"):  # the premise: a local optimum of single moves
        assert all(search.score(problem, {**start, m: p}) >= s0 for p in cands[m])
    deadline = time.perf_counter() + 60
    plan, s = search._descend(dict(start), s0, cands, ["a", "b"], lambda p: search.score(
        problem, p), deadline)  # fmt: skip
    best, _ = _brute_force(problem)
    assert s == pytest.approx(best) and s < s0
    assert {plan["a"].lo, plan["b"].lo} == {0, 1} and plan["a"].n == plan["b"].n == 1


def test_a_model_too_big_for_one_device_gets_model_parallelism():
    """A device holds 4 GB; the training state of this model (16 bytes per weight) needs more
    than one, so the train step must shard it over both devices (tp or pp)."""
    big = dataclasses.replace(SMALL, n_layers=24, hidden_size=1024, intermediate_size=2048)
    assert big.params * 16 > DEV.memory * 0.9
    assert big.params * 16 / 2 < DEV.memory * 0.9 * 0.8
    mfcs = [MFCDef("train", "m", "train_step", InterfaceSpec("x"), 8, ("prompts",), ())]
    problem = problem_from_dfg(build_dfg(mfcs), {"m": big}, make_cluster(per=2), 32, 32)
    found = search.search(problem, budget_s=10, max_iters=50)
    lay = found.plan["train"].layout
    assert lay.tp * lay.pp == 2 and found.step_time_s < search.INF


def test_a_generation_too_big_to_train_on_its_devices_is_still_a_candidate():
    """A generate call of a trained role holds a weight copy where it runs; the training state
    stays on the train_step's devices. So a device that cannot hold this model's training state
    (16 bytes per weight) can still generate: every placement of the generate call that gives a
    fitting plan (full memory accounting) with the train step on both devices is a candidate."""
    big = dataclasses.replace(SMALL, n_layers=24, hidden_size=1024, intermediate_size=2048)
    assert big.params * 16 > DEV.memory * 0.9  # no training state on one device
    mfcs = [
        MFCDef("gen", "m", "generate", InterfaceSpec("x"), 4, ("prompts",), ("answers",)),
        MFCDef("train", "m", "train_step", InterfaceSpec("x"), 4, ("answers",), ()),
    ]
    problem = problem_from_dfg(build_dfg(mfcs), {"m": big}, make_cluster(per=2), 32, 32)
    train = Placement(Layout(1, 2, 1), 0)
    fitting = {
        Placement(lay, lo)
        for lo, n in problem.ranges()
        for lay in problem.layouts("gen", n)
        if problem.fits({"gen": Placement(lay, lo), "train": train})
    }
    assert Placement(Layout(), 0) in fitting  # the premise: one device generates
    assert fitting <= set(search.candidates(problem, "gen", keep=100))


def test_candidates_keep_every_layout_leaner_than_all_faster_ones():
    """Where other calls leave little memory the fastest layouts may not fit: besides the
    `keep` fastest, every layout of a range that needs less memory than every faster one is a
    candidate (no other is: a slower layout needing as much is never better)."""
    problem, _ = ppo_problem(make_cluster(nodes=2, per=4))
    for name in ("critic_inf", "actor_gen", "actor_train"):
        for lo, n in ((0, 4), (0, 8)):
            rows = [
                (problem.time(name, Placement(lay, lo)), str(lay),
                 search._own_bytes(problem, name, Placement(lay, lo)))
                for lay in problem.layouts(name, n)
            ]  # fmt: skip
            rows = [r for r in rows if r[2] <= DEV.memory * 0.9]
            faster = {r[1]: [q for q in rows if q[:2] < r[:2]] for r in rows}
            expected = {
                r[1] for r in rows
                if len(faster[r[1]]) < 3 or all(q[2] > r[2] for q in faster[r[1]])
            }  # fmt: skip
            got = {
                str(p.layout) for p in search.candidates(problem, name) if (p.lo, p.n) == (lo, n)
            }
            assert got == expected, (name, n)
    lean = {str(p.layout) for p in search.candidates(problem, "critic_inf") if p.n == 4}
    assert len(lean) > 3  # the premise: more than the 3 fastest


def test_nothing_fits_gives_no_plan():
    huge = dataclasses.replace(SMALL, n_layers=200, hidden_size=4096, intermediate_size=8192)
    problem = _two_inferences(make_cluster(per=2), huge)
    found = search.search(problem, budget_s=5, max_iters=10)
    assert found.step_time_s == search.INF and found.plan == {}


def test_baselines_place_what_they_say(ppo4):
    problem, _ = ppo4
    col, halves, real = search.baselines(problem)
    assert len({str(p) for p in col.plan.values() if p.n > 1}) == 1
    assert all(p.n == 4 for m, p in col.plan.items() if m != "rew_inf")
    assert str(halves.plan["actor_gen"]).endswith("@0-1")
    assert all(str(p).endswith("@2-3") for m, p in halves.plan.items() if m not in
               ("actor_gen", "rew_inf"))  # fmt: skip
    assert all(p.n == 4 for m, p in real.plan.items() if m != "rew_inf")
    best = search.search(problem, budget_s=20, max_iters=200)
    assert best.step_time_s <= min(b.step_time_s for b in (col, halves, real))
