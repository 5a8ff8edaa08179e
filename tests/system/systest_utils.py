"""Helpers for runtime tests: toy runs, their traces, and the rules a trace must obey."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from realflow.api.dfg import DataflowGraph
from realflow.system import runner
from realflow.system.master import Master
from realflow.system.toy_interfaces import ToyConfig, ToyNode
from realflow.system.worker import Kind

# Float rounding of trace timestamps (microseconds); real violations are milliseconds or more.
EPS_US = 1.0


@dataclasses.dataclass
class Event:
    mfc: str
    worker: int
    step: int
    start: float  # us
    end: float  # us
    store: int
    version: int  # parameter version of the model the call read


def load_trace(output_dir: str) -> tuple[list[Event], dict[int, str]]:
    """The MFC events of `output_dir/trace.json` and the worker track names."""
    with open(os.path.join(output_dir, "trace.json")) as f:
        trace = json.load(f)
    events, names = [], {}
    for e in trace["traceEvents"]:
        if e["ph"] == "M" and e["name"] == "thread_name":
            names[e["tid"]] = e["args"]["name"]
        elif e["ph"] == "X" and "version" in e["args"]:  # MFC calls (not checkpoint saves)
            events.append(
                Event(
                    e["name"],
                    e["tid"],
                    e["args"]["step"],
                    e["ts"],
                    e["ts"] + e["dur"],
                    e["args"]["store"],
                    e["args"]["version"],
                )
            )
    return events, names


def load_saves(output_dir: str) -> dict[int, tuple[float, float]]:
    """step -> (start, end) in us of every checkpoint save in `output_dir/trace.json`."""
    with open(os.path.join(output_dir, "trace.json")) as f:
        trace = json.load(f)
    return {
        e["args"]["step"]: (e["ts"], e["ts"] + e["dur"])
        for e in trace["traceEvents"]
        if e["ph"] == "X" and e["name"].startswith("save step_")
    }


def by_key(events: list[Event]) -> dict[tuple[str, int], Event]:
    index = {(e.mfc, e.step): e for e in events}
    assert len(index) == len(events), "an MFC ran twice in one step"
    return index


def overlap(a: Event, b: Event) -> bool:
    return a.start < b.end - EPS_US and b.start < a.end - EPS_US


def check_dependencies(events: list[Event], dfg: DataflowGraph) -> None:
    """Every consumer starts after each of its producers (same step) has ended."""
    index = by_key(events)
    for e in events:
        for producer in dfg.graph.predecessors(e.mfc):
            p = index[(producer, e.step)]
            assert e.start >= p.end - EPS_US, f"{e} started before its producer {p} ended"


def check_parameter_versions(events: list[Event], dfg: DataflowGraph) -> None:
    """A call on model M at step t+1 starts after train_step of M at step t has ended."""
    index = by_key(events)
    trainer = {m.model_name: m.name for m in dfg.mfcs if m.is_train}
    model = {m.name: m.model_name for m in dfg.mfcs}
    for e in events:
        train = index.get((trainer.get(model[e.mfc], ""), e.step - 1))
        if train is not None:
            assert e.start >= train.end - EPS_US, f"{e} read weights before {train} ended"


def check_one_call_per_worker(events: list[Event]) -> None:
    """Calls on one worker never overlap: roles sharing a worker run one at a time."""
    for w in {e.worker for e in events}:
        mine = sorted((e for e in events if e.worker == w), key=lambda e: e.start)
        for a, b in zip(mine, mine[1:]):
            assert b.start >= a.end - EPS_US, f"{a} and {b} overlap on worker {w}"


class Spy:
    """Patches the runner to keep its master and transport, and (with `store_check`, for runs
    that succeed) to ask every worker its store size (Kind.STORE_SIZE) right before the
    transport shuts down."""

    def __init__(self, monkeypatch: Any, store_check: bool = False):
        self.store_check = store_check
        self.masters: list[Master] = []
        self.transports: list[Any] = []
        self.store_sizes: list[list[int]] = []
        spy = self

        class SpyMaster(Master):
            def __init__(self, *args: Any, **kwargs: Any):
                super().__init__(*args, **kwargs)
                spy.masters.append(self)

        make = runner.make_transport

        def make_transport(cfg: Any) -> Any:
            transport = make(cfg)
            shutdown = transport.shutdown

            def shutdown_after_store_check(wait: bool = True) -> None:
                if spy.store_check:
                    workers = list(range(transport.n_workers))
                    spy.store_sizes.append(transport.call_all(workers, Kind.STORE_SIZE))
                shutdown(wait)

            transport.shutdown = shutdown_after_store_check
            spy.transports.append(transport)
            return transport

        monkeypatch.setattr(runner, "Master", SpyMaster)
        monkeypatch.setattr(runner, "make_transport", make_transport)

    def calls_in_flight(self) -> list[Any]:
        """(kind, mfc, step) of the calls the latest master has in flight (from any thread)."""
        if not self.masters:
            return []
        for _ in range(100):
            try:
                return [(c.kind, c.mfc, c.step) for c in list(self.masters[-1].calls.values())]
            except RuntimeError:  # the dict changed size while copied
                time.sleep(0.01)
        return []


def toy_config(tmp_path: Any, nodes: list[ToyNode], **kwargs: Any) -> ToyConfig:
    return ToyConfig(nodes=nodes, output_dir=str(tmp_path), **kwargs)


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def checkpoint_dirs(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, "checkpoints")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def check_checkpoints_intact(output_dir: str, expect_latest: int) -> None:
    """The newest checkpoint is step_<expect_latest> with meta.json; no partial step_* dirs."""
    from realflow.system.checkpoint import latest_checkpoint

    names = checkpoint_dirs(output_dir)
    steps = [n for n in names if n.startswith("step_")]
    for n in steps:
        path = os.path.join(output_dir, "checkpoints", n)
        assert os.path.isfile(os.path.join(path, "meta.json")), f"{n} has no meta.json"
    assert not [n for n in names if n.startswith(".tmp")], names
    found = latest_checkpoint(output_dir)
    assert found is not None and found[0] == expect_latest, (found, names)


def metric_steps(output_dir: str) -> list[int]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def without_time(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def run_ppo_like_and_check(tmp_path: Any, spy: Spy, mode: str, steps: int = 3) -> None:
    """Run the PPO-shaped toy graph with 0.2 s calls (critic_train 0.3 s) and check what its
    trace must show."""
    from realflow.system.toy_interfaces import ppo_like_nodes

    # critic_train (0.3 s) outlasts actor_train (0.2 s) by 0.1 s, so the next step's actor_gen
    # (which waits only for actor_train) starts while it runs, and it ends 0.1 s before that
    # actor_gen does, so the next critic_inf is ready with rew_inf and ref_inf: equal sleeps
    # made the first overlap a race, 0.4 s the second.
    nodes = [
        dataclasses.replace(n, sleep_s=0.3) if n.name == "critic_train" else n
        for n in ppo_like_nodes(0.2)
    ]
    cfg = toy_config(tmp_path, nodes, total_steps=steps, mode=mode)
    result = runner.run("toy", cfg)
    assert [r["step"] for r in result.rows] == list(range(1, steps + 1))
    events, names = load_trace(str(tmp_path))
    assert names == {
        0: "worker 0 (actor)",
        1: "worker 1 (rew)",
        2: "worker 2 (ref)",
        3: "worker 3 (critic)",
        4: "master (checkpoints)",
    }
    index = by_key(events)
    assert set(index) == {(n.name, s) for n in cfg.nodes for s in range(1, steps + 1)}
    dfg = cfg.dfg()
    check_dependencies(events, dfg)
    check_parameter_versions(events, dfg)
    check_one_call_per_worker(events)
    for s in range(1, steps + 1):  # independent inference calls run at the same time
        rew, ref, val = (index[(n, s)] for n in ("rew_inf", "ref_inf", "critic_inf"))
        assert overlap(rew, ref) and overlap(ref, val) and overlap(rew, val), (rew, ref, val)
    # Another model's train_step may overlap the next step's generation, and must here.
    assert any(
        overlap(index[("critic_train", s)], index[("actor_gen", s + 1)]) for s in range(1, steps)
    )
    # Every worker's store is empty after the run.
    assert spy.store_sizes == [[0, 0, 0, 0]]
