"""PPO step time with and without a separate generation layout, on 4 CPU worker processes:
`python benchmarks/bench_mesh_ppo.py [STEPS] [N_SEQS]`.

Runs ppo (configs/ppo_tiny.yaml, builtin:reverse-sft actor, `n_seqs` prompts a step, 16 new
tokens, one minibatch) in mode=ray for STEPS steps (default 12) in each allocation below; every
layout uses the same 4 workers. Prints, per layout: the median `time/step_s` over steps 2..STEPS
(step 1 pays warm-up), the median duration of actor_gen and actor_train per step, and of the
realloc per step (the longest worker's part; 0 without one), from trace.json.

- `per role`: worker indices (actor 0, ref 1, critic 2, rew 3): one worker per role, no mesh;
- `one mesh`: actor_gen and actor_train both on d2t1p1@0-1 (no realloc);
- `gen d2t1p1`: actor_train d2t1p1@0-1, actor_gen d2t1p1@2-3 (a realloc per step);
- `gen d1t2p1`: actor_train d2t1p1@0-1, actor_gen d1t2p1@2-3 (tensor-parallel generation).
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import tempfile

from realflow.api.config import apply_overrides
from realflow.api.registry import EXPERIMENTS
from realflow.system.runner import run

REST = ["allocation.ref=d2t1p1@2-3", "allocation.critic=3", "allocation.rew=3"]
LAYOUTS: list[tuple[str, list[str]]] = [
    ("per role", ["allocation.actor=0", "allocation.ref=1", "allocation.critic=2", "allocation.rew=3"]),
    ("one mesh", ["allocation.actor=d2t1p1@0-1", *REST]),
    ("gen d2t1p1", ["allocation.actor_train=d2t1p1@0-1", "allocation.actor_gen=d2t1p1@2-3", *REST]),
    ("gen d1t2p1", ["allocation.actor_train=d2t1p1@0-1", "allocation.actor_gen=d1t2p1@2-3", *REST]),
]  # fmt: skip


def per_step(trace: str, prefix: str) -> list[float]:
    """The longest worker's duration (s) of the events named `prefix`... in each step >= 2."""
    with open(trace) as f:
        events = [e for e in json.load(f)["traceEvents"] if e["ph"] == "X"]
    longest: dict[int, float] = collections.defaultdict(float)
    for e in events:
        if e["name"].startswith(prefix) and e["args"].get("step", 0) >= 2:
            longest[e["args"]["step"]] = max(longest[e["args"]["step"]], e["dur"] / 1e6)
    return list(longest.values())


def run_one(overrides: list[str], steps: int, n_seqs: int, out: str) -> dict[str, float]:
    cfg = apply_overrides(
        EXPERIMENTS.get("ppo"),
        [
            f"output_dir={out}", "tensorboard=false", "progress_bar=false", "mode=ray",
            f"total_steps={steps}", f"n_seqs={n_seqs}", "save_freq_steps=0",
            "ppo.ppo_n_minibatches=1", "ppo.gen.max_new_tokens=16", *overrides,
        ],
        ["configs/ppo_tiny.yaml"],
    )  # fmt: skip
    rows = run("ppo", cfg).rows
    trace = os.path.join(out, "trace.json")
    med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    return {
        "step_s": med([r["time/step_s"] for r in rows[1:]]),
        "gen_s": med(per_step(trace, "actor_gen")),
        "train_s": med(per_step(trace, "actor_train")),
        "realloc_s": med(per_step(trace, "realloc ")),
    }


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    n_seqs = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    root = tempfile.mkdtemp(prefix="realflow-bench-mesh-")
    print(f"{'layout':<12}{'s/step':>8}{'actor_gen s':>12}{'actor_train s':>14}{'realloc s':>10}")
    for name, overrides in LAYOUTS:
        r = run_one(overrides, steps, n_seqs, os.path.join(root, name.replace(" ", "_")))
        print(
            f"{name:<12}{r['step_s']:>8.3f}{r['gen_s']:>12.3f}{r['train_s']:>14.3f}"
            f"{r['realloc_s']:>10.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
