"""The master's schedule, read back from trace.json: concurrency, data dependencies, the
parameter-version rule, shared workers, and when a step's data is freed (mode=local)."""

from __future__ import annotations

import pytest
from systest_utils import (
    Spy,
    by_key,
    check_dependencies,
    check_one_call_per_worker,
    check_parameter_versions,
    load_trace,
    overlap,
    run_ppo_like_and_check,
    toy_config,
)

from realflow.system import runner
from realflow.system.toy_interfaces import ToyNode, ppo_like_nodes

pytestmark = pytest.mark.timeout(60)


def test_ppo_like_trace_local(tmp_path, monkeypatch):
    run_ppo_like_and_check(tmp_path, Spy(monkeypatch, store_check=True), "local")


def test_roles_sharing_a_worker_run_one_at_a_time(tmp_path, monkeypatch):
    spy = Spy(monkeypatch, store_check=True)
    allocation = {"actor": 0, "rew": 1, "ref": 1, "critic": 1}
    cfg = toy_config(tmp_path, ppo_like_nodes(0.1), total_steps=2, allocation=allocation)
    runner.run("toy", cfg)
    events, names = load_trace(str(tmp_path))
    assert names == {
        0: "worker 0 (actor)",
        1: "worker 1 (rew, ref, critic)",
        2: "master (checkpoints)",
    }
    assert {e.mfc: e.worker for e in events} == {
        "actor_gen": 0,
        "actor_train": 0,
        "rew_inf": 1,
        "ref_inf": 1,
        "critic_inf": 1,
        "critic_train": 1,
    }
    assert len(events) == 12
    check_one_call_per_worker(events)
    check_dependencies(events, cfg.dfg())
    check_parameter_versions(events, cfg.dfg())
    assert spy.store_sizes == [[0, 0]]


def test_train_waits_for_every_call_on_its_model(tmp_path):
    """actor_train(t) starts after every actor call of step t; actor_gen(t+1) after it."""
    nodes = [
        ToyNode("gen", "actor", "generate", ["packed_prompts"], ["seq"], 0.1),
        ToyNode("actor_inf", "actor", "inference", ["seq"], ["logp"], 0.1),
        ToyNode("score", "rew", "inference", ["seq"], ["rew"], 0.3),
        ToyNode("train", "actor", "train_step", ["seq", "rew"], [], 0.05),
    ]
    cfg = toy_config(tmp_path, nodes, total_steps=3)
    runner.run("toy", cfg)
    events, _ = load_trace(str(tmp_path))
    index = by_key(events)
    for s in (1, 2, 3):
        # train reads only seq and rew, yet must wait for actor_inf (same model, same step)
        assert index[("train", s)].start >= index[("actor_inf", s)].end
    check_dependencies(events, cfg.dfg())
    check_parameter_versions(events, cfg.dfg())


def test_store_does_not_grow_with_steps(tmp_path, monkeypatch):
    """With 12 steps the largest store stays within what two or three steps in flight hold."""
    spy = Spy(monkeypatch, store_check=True)
    n = 4
    cfg = toy_config(tmp_path, ppo_like_nodes(0.0), total_steps=12, n_seqs=n)
    runner.run("toy", cfg)
    events, _ = load_trace(str(tmp_path))
    keys_per_step = 5  # packed_prompts, seq, rew, ref, val
    peak = max(e.store for e in events)
    assert 0 < peak <= 3 * keys_per_step * n, peak
    assert spy.store_sizes == [[0, 0, 0, 0]]


def test_steps_in_flight_overlap_only_across_models(tmp_path):
    """Two steps are in flight: a step-t call of one model overlaps a step-t+1 call of
    another, but the parameter-version rule still holds on every model."""
    nodes = ppo_like_nodes(0.1)
    nodes[5].sleep_s = 0.4  # a slow critic_train lets the next step's rew/ref calls overlap it
    cfg = toy_config(tmp_path, nodes, total_steps=3)
    runner.run("toy", cfg)
    events, _ = load_trace(str(tmp_path))
    index = by_key(events)
    check_dependencies(events, cfg.dfg())
    check_parameter_versions(events, cfg.dfg())
    assert any(
        overlap(index[("critic_train", s)], index[(n, s + 1)])
        for s in (1, 2)
        for n in ("actor_gen", "rew_inf", "ref_inf")
    )
    for s in (1, 2):  # ...but critic_inf(t+1) waits for critic_train(t)
        assert index[("critic_inf", s + 1)].start >= index[("critic_train", s)].end
