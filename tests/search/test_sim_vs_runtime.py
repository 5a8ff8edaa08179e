"""The simulator and the runtime give the same schedule for the same graph and call times: a
real toy run (mode=local, calls that sleep, one worker per role) against the master driven on a
virtual clock with the same placement as one-worker meshes."""

from __future__ import annotations

import json
import os

import pytest

from realflow.parallel.layout import Layout, Mesh
from realflow.search.master_adapter import run_master
from realflow.system import runner
from realflow.system.toy_interfaces import ToyConfig, ppo_like_nodes

pytestmark = pytest.mark.timeout(120)

SLEEP = {"actor_gen": 0.12, "rew_inf": 0.02, "ref_inf": 0.06, "critic_inf": 0.04,
         "actor_train": 0.15, "critic_train": 0.3}  # fmt: skip
WORKER = {"actor": 0, "rew": 1, "ref": 1, "critic": 2}


def _no_realloc(role, src, dst):
    raise AssertionError(f"every role has one mesh, yet {role} was reallocated {src} -> {dst}")


def _per_worker(calls):
    """worker -> [(mfc, step)] in start order."""
    out: dict[int, list[tuple[str, int]]] = {}
    for worker, mfc, step, _start in sorted(calls, key=lambda c: c[3]):
        out.setdefault(worker, []).append((mfc, step))
    return out


def test_simulated_schedule_is_the_runtime_schedule(tmp_path):
    nodes = ppo_like_nodes()
    for n in nodes:
        n.sleep_s = SLEEP[n.name]
    cfg = ToyConfig(nodes=nodes, output_dir=str(tmp_path), total_steps=3, allocation=WORKER)
    runner.run("toy", cfg)
    with open(os.path.join(tmp_path, "trace.json")) as f:
        trace = json.load(f)["traceEvents"]
    real = [(e["tid"], e["name"], e["args"]["step"], e["ts"]) for e in trace
            if e["ph"] == "X" and "version" in e["args"]]  # fmt: skip

    dfg = cfg.dfg()
    role = {m.name: m.model_name for m in dfg.mfcs}
    meshes = {m.name: Mesh(Layout(), (WORKER[role[m.name]],)) for m in dfg.mfcs}
    events = run_master(dfg, meshes, lambda name, step: SLEEP[name], _no_realloc, n_steps=3)
    sim = [(e.worker, e.mfc, e.step, e.start) for e in events if e.kind == "mfc"]

    assert _per_worker(sim) == _per_worker(real)
    # the overlap the version rule allows: actor_gen of step 2 runs beside critic_train of 1
    by = {(m, s): (t, w) for w, m, s, t in sim}
    assert by[("actor_gen", 2)][0] < by[("critic_train", 1)][0] + SLEEP["critic_train"]
