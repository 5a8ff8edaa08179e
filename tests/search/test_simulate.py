"""The simulator runs the real master: its schedules follow the master's rules, and the
search's fast estimate gives the same step time on the same durations."""

from __future__ import annotations

import json
import random

import pytest
from conftest import make_cluster, ppo_problem

from realflow.parallel.layout import Layout
from realflow.search import estimate, simulate
from realflow.search.plan import Placement


def _random_plan(problem, rng):
    plan = {}
    for t in problem.tasks:
        lo, n = rng.choice(problem.ranges())
        plan[t.name] = Placement(rng.choice(problem.layouts(t.name, n)), lo)
    return plan


def test_estimate_equals_the_master_driven_simulation(ppo4):
    """Random plans on 4 devices (overlapping, disjoint, shared meshes; reallocs between a
    role's meshes; the weightless scorer anywhere): the list-scheduling estimate and the real
    master give the same step ends."""
    problem, dfg = ppo4
    rng = random.Random(0)
    for _ in range(20):
        plan = _random_plan(problem, rng)
        sim = simulate.simulate(problem, plan, dfg, n_steps=4)
        ends = estimate.step_ends(estimate.schedule(problem, plan, n_steps=4))
        assert sim.step_ends == pytest.approx(ends, rel=1e-12), {k: str(v) for k, v in plan.items()}


def test_parameter_version_rule_and_device_exclusivity(ppo4):
    """actor_gen of step t+1 starts after actor_train of step t ends even on other devices; no
    device runs two calls at once; critic_train waits for critic_inf of its step."""
    problem, dfg = ppo4
    plan = {
        "actor_gen": Placement(Layout(2, 1, 1), 0),
        "rew_inf": Placement(Layout(1, 1, 1), 0),
        "ref_inf": Placement(Layout(1, 1, 1), 2),
        "critic_inf": Placement(Layout(1, 1, 1), 3),
        "actor_train": Placement(Layout(1, 2, 1), 2),
        "critic_train": Placement(Layout(1, 1, 1), 3),
    }
    sim = simulate.simulate(problem, plan, dfg, n_steps=3)
    by = {(e.name, e.step, e.device): e for e in sim.events}
    for step in (1, 2):
        gen_next = min(e.start for e in sim.events if e.name == "actor_gen" and e.step == step + 1)
        train = by[("actor_train", step, 2)]
        assert gen_next >= train.end
        assert by[("critic_train", step, 3)].start >= by[("critic_inf", step, 3)].end
    per_device = {}
    for e in sim.events:
        per_device.setdefault(e.device, []).append((e.start, e.end))
    for spans in per_device.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:], strict=False))
    # actor_gen is on another mesh than actor_train: a realloc precedes its later generations
    assert {e.step for e in sim.events if e.name == "realloc actor"} == {2, 3}


def test_realloc_occupies_both_meshes_from_step_2(ppo4):
    """Generation on devices 0-1, every other call with weights on 2-3 (one layout): each step
    runs serially, and from step 2 on the actor's weights move 2-3 -> 0-1 first, holding all
    four devices. Step ends by hand: E1 = S, E_t = E_{t-1} + r + S (S: the calls' sum, r:
    the realloc)."""
    problem, dfg = ppo4
    rest = Placement(Layout(1, 2, 1), 2)
    plan = {t.name: rest for t in problem.tasks}
    plan["actor_gen"] = Placement(Layout(2, 1, 1), 0)
    plan["rew_inf"] = Placement(Layout(), 0)  # weightless: pinned to device 0, free
    total = sum(problem.time(t.name, plan[t.name]) for t in problem.tasks)
    r = problem.realloc_time("actor", rest, plan["actor_gen"])
    assert r > 0
    sim = simulate.simulate(problem, plan, dfg, n_steps=3)
    assert sim.step_ends == pytest.approx([total, 2 * total + r, 3 * total + 2 * r])
    assert sim.step_time_s == pytest.approx(total + r)
    for step in (2, 3):
        moves = [e for e in sim.events if e.name == "realloc actor" and e.step == step]
        assert sorted(e.device for e in moves) == [0, 1, 2, 3]
        end = sim.step_ends[step - 2]
        assert all((e.start, e.end) == pytest.approx((end, end + r)) for e in moves)
        gens = [e for e in sim.events if e.name == "actor_gen" and e.step == step]
        assert sorted(e.device for e in gens) == [0, 1]
        assert all(e.start == pytest.approx(end + r) for e in gens)
    assert not any(e.name.startswith("realloc critic") for e in sim.events)  # one mesh
    assert estimate.step_ends(estimate.schedule(problem, plan, 3)) == sim.step_ends


def test_trace_is_the_runtime_format(ppo4, tmp_path):
    problem, dfg = ppo4
    plan = {t.name: Placement(Layout(4, 1, 1), 0) for t in problem.tasks}
    sim = simulate.simulate(problem, plan, dfg, n_steps=2)
    path = tmp_path / "trace.json"
    simulate.write_trace(sim, str(path), 4)
    trace = json.loads(path.read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    # 5 MFCs with weights x 2 steps x 4 devices; nothing else (one layout: no realloc)
    assert len(xs) == 5 * 2 * 4
    assert {e["tid"] for e in xs} == {0, 1, 2, 3}
    assert all(e["dur"] >= 0 and {"step", "version"} <= set(e["args"]) for e in xs)
    # colocated on all devices, every device is busy the whole steady state
    assert all(u == pytest.approx(1.0) for u in sim.utilisation.values())


def test_peak_memory_by_hand():
    """Everything on one device: actor and critic training state, ref's weights, plus the
    largest working set; a second device holding only ref's weights and its activations."""
    problem, _ = ppo_problem(make_cluster(per=2))
    m = problem.by_name["actor_train"].model
    one = Placement(Layout(1, 1, 1), 0)
    plan = {t.name: one for t in problem.tasks}
    plan["ref_inf"] = Placement(Layout(1, 1, 1), 1)
    from realflow.search import cost

    p_dev = cost.device_params(m, Layout())
    acts = {
        n: cost.activation_bytes(m, Layout(), problem.by_name[n].work, problem.dev)
        for n in ("actor_gen", "critic_inf", "actor_train", "critic_train", "ref_inf")
    }
    expected0 = 2 * p_dev * 16 + max(acts[n] for n in acts if n != "ref_inf")
    expected1 = p_dev * 2 + acts["ref_inf"]
    peak = problem.peak_memory(plan)
    assert peak == {0: pytest.approx(expected0), 1: pytest.approx(expected1)}
