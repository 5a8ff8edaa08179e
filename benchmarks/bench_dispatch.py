"""Master dispatch overhead per model function call (MFC), with no-op toy interfaces.

    .venv/bin/python benchmarks/bench_dispatch.py [--modes local ray] [--quick]

Runs `ToyConfig` graphs whose interfaces sleep 0 s through `realflow.system.runner.run`, and times
`Master.run` only (worker setup and checkpoint saves are left out). Two graphs:

- `ppo6`: `ppo_like_nodes()`, 6 MFCs on 4 workers (one per role);
- `ppo600`: 100 independent PPO-shaped chains (`actor{i}_gen -> rew{i}/ref{i}/critic{i}_inf ->
  actor{i}/critic{i}_train`, unique names and keys), 600 MFCs on the same 4 workers: the roles
  of chain i are placed with `allocation` on worker 0 (actor), 1 (rew), 2 (ref), 3 (critic).

Columns:
- `wall/MFC`: wall time of Master.run / MFC calls. With no-op interfaces every call is pure
  runtime cost: the master's bookkeeping, the transport, and the worker's store and toy work.
- `master/MFC`: the part of it the master spends outside `transport.wait` (its own scheduling
  and submission cost), / MFC calls.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realflow.system import runner  # noqa: E402
from realflow.system.master import Master  # noqa: E402
from realflow.system.toy_interfaces import ToyConfig, ToyNode, ppo_like_nodes  # noqa: E402


def chains(n: int) -> tuple[list[ToyNode], dict[str, int]]:
    """n independent PPO-shaped chains, and an allocation of their roles onto 4 workers."""
    nodes, allocation = [], {}
    for i in range(n):
        seq, rew, ref, val = f"seq{i}", f"rew{i}", f"ref{i}", f"val{i}"
        train_in = [seq, rew, ref, val]
        nodes += [
            ToyNode(f"actor{i}_gen", f"actor{i}", "generate", ["packed_prompts"], [seq]),
            ToyNode(f"rew{i}_inf", f"rew{i}", "inference", [seq], [rew]),
            ToyNode(f"ref{i}_inf", f"ref{i}", "inference", [seq], [ref]),
            ToyNode(f"critic{i}_inf", f"critic{i}", "inference", [seq], [val]),
            ToyNode(f"actor{i}_train", f"actor{i}", "train_step", train_in),
            ToyNode(f"critic{i}_train", f"critic{i}", "train_step", train_in),
        ]
        for w, role in enumerate((f"actor{i}", f"rew{i}", f"ref{i}", f"critic{i}")):
            allocation[role] = w
    return nodes, allocation


class TimedMaster(Master):
    """Master.run with its wall time, its time in transport.wait and its saves measured."""

    last: dict[str, float] = {}

    def run(self, first_step, last_step, on_step_end, save_after, save):
        waited = [0.0]
        saving = [0.0]
        wait = self.transport.wait

        def timed_wait(handles, timeout):
            t = time.perf_counter()
            try:
                return wait(handles, timeout)
            finally:
                waited[0] += time.perf_counter() - t

        def timed_save(step):
            t = time.perf_counter()
            save(step)
            saving[0] += time.perf_counter() - t

        self.transport.wait = timed_wait
        t0 = time.perf_counter()
        try:
            super().run(first_step, last_step, on_step_end, save_after, timed_save)
        finally:
            self.transport.wait = wait
        wall = time.perf_counter() - t0 - saving[0]
        TimedMaster.last = {"wall": wall, "waited": waited[0]}


def bench(graph: str, mode: str, steps: int) -> dict[str, float]:
    if graph == "ppo6":
        nodes, allocation = ppo_like_nodes(0.0), {}
    else:
        nodes, allocation = chains(100)
    with tempfile.TemporaryDirectory() as out:
        cfg = ToyConfig(
            nodes=nodes,
            allocation=allocation,
            total_steps=steps,
            output_dir=out,
            mode=mode,
        )
        runner.run("bench", cfg)
    t = TimedMaster.last
    calls = len(nodes) * steps
    return {
        "calls": calls,
        "wall_ms": t["wall"] * 1e3 / calls,
        "master_ms": (t["wall"] - t["waited"]) * 1e3 / calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runner.Master = TimedMaster  # the runner builds its master through this name
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    plan = {"ppo6": 50 if args.quick else 200, "ppo600": 2 if args.quick else 5}
    rows = []
    for mode in args.modes:
        for graph, steps in plan.items():
            if mode == "ray":
                import ray

                # One cluster for all Ray rows: the transport joins it and leaves it running.
                if not ray.is_initialized():
                    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            r = bench(graph, mode, steps)
            rows.append((graph, mode, steps, r))
            print(
                f"{graph:<8}{mode:<7}{steps:>6} steps {r['calls']:>7} MFCs "
                f"{r['wall_ms']:>9.3f} ms wall/MFC {r['master_ms']:>9.3f} ms master/MFC",
                flush=True,
            )
    print()
    print("| graph | mode | steps | MFC calls | wall/MFC (ms) | master/MFC (ms) |")
    print("|---|---|---:|---:|---:|---:|")
    for graph, mode, steps, r in rows:
        print(
            f"| {graph} | {mode} | {steps} | {r['calls']} | {r['wall_ms']:.3f} "
            f"| {r['master_ms']:.3f} |"
        )


if __name__ == "__main__":
    main()
