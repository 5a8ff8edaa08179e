"""Asynchronous GRPO, measured: `python benchmarks/bench_async.py [SECONDS] [K ...]`.

Runs grpo on the built-in default (builtin:reverse) in this process (mode=local) for the same
wall-time budget (default 60 s of training, worker setup left out) with generation on its own
worker (`async.separate_gen=true`) and `async.max_staleness` = each K (default 0 1 2; K > 0
with each correction: `decoupled`, which adds an actor_prox forward pass per step, and `tis`),
plus today's layout (actor_gen on the actor's worker) as `sync`. A callback stops each run at
the first step boundary past the budget. Prints, per run: steps done, seconds per step
(training wall time / steps: throughput, which overlapping steps raise), the process CPU time
per step (all threads; steadier than wall time on a shared machine), the mean staleness, and
the reward (`reward/mean`) over the first 10 steps and over the last 10 steps before the
budget ran out.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from typing import Any

from realflow.api.callbacks import CALLBACKS, Callback, RunContext
from realflow.api.config import apply_overrides
from realflow.api.registry import EXPERIMENTS
from realflow.system.runner import run


@CALLBACKS.register("bench_wall_budget")
class WallBudget(Callback):
    """Stops the run at the first step that ends `seconds` after the first step started."""

    def __init__(self, seconds: float = 60.0):
        self.seconds = seconds
        self.t0 = 0.0
        self.ends: list[float] = []

    def on_run_start(self, ctx: RunContext) -> None:
        self.t0 = time.time()

    def on_step_end(self, ctx: RunContext, step: int, metrics: dict[str, Any]) -> None:
        self.ends.append(time.time())
        if self.ends[-1] - self.t0 >= self.seconds:
            ctx.request_stop(f"wall-time budget {self.seconds:g} s")


def run_one(name: str, overrides: list[str], seconds: float, out: str) -> dict[str, Any]:
    cfg = apply_overrides(
        EXPERIMENTS.get("grpo"),
        [
            f"output_dir={out}", "tensorboard=false", "progress_bar=false", "total_steps=100000",
            "save_freq_steps=0", "callbacks=[bench_wall_budget]",
            f"callback_args.bench_wall_budget.seconds={seconds}", *overrides,
        ],
    )  # fmt: skip
    t0, cpu0 = time.time(), time.process_time()
    rows = run("grpo", cfg).rows
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    first = statistics.mean(r["reward/mean"] for r in rows[:10])
    last = statistics.mean(r["reward/mean"] for r in rows[-10:])
    return {
        "name": name,
        "steps": len(rows),
        "step_s": seconds / len(rows),
        "cpu_step_s": cpu / len(rows),
        "staleness": statistics.mean(r.get("staleness/mean", 0.0) for r in rows),
        "first": first,
        "last": last,
        "wall_s": wall,
    }


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    ks = [int(k) for k in sys.argv[2:]] or [0, 1, 2]
    runs: list[tuple[str, list[str]]] = [("sync", [])]
    for k in ks:
        async_keys = ["async.separate_gen=true", f"async.max_staleness={k}"]
        for correction in ["decoupled", "tis"] if k > 0 else ["-"]:
            name = f"k={k}" + (f" {correction}" if k > 0 else "")
            extra = [f"async.correction={correction}"] if k > 0 else []
            runs.append((name, async_keys + extra))
    root = tempfile.mkdtemp(prefix="realflow-bench-async-")
    print(
        f"{'run':<14}{'steps':>6}{'s/step':>8}{'cpu s/step':>11}{'staleness':>10}"
        f"{'reward first 10':>16}{'reward last 10':>15}{'wall s':>8}"
    )
    for name, overrides in runs:
        r = run_one(name, overrides, seconds, f"{root}/{name.replace(' ', '_')}")
        print(
            f"{r['name']:<14}{r['steps']:>6}{r['step_s']:>8.3f}{r['cpu_step_s']:>11.3f}"
            f"{r['staleness']:>10.2f}{r['first']:>16.3f}{r['last']:>15.3f}{r['wall_s']:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
