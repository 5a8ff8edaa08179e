"""The embedded defaults, measured: `python benchmarks/bench_defaults.py [EXP ...]`.

Runs each built-in experiment with no arguments but an output directory (as `make demo` does for
ppo) in a fresh process, and prints the key metric over the first and last 10% of steps, the
mean step time, the wall time of the whole command (including first-use SFT of the built-in
actor when the cache is cold), its CPU time (user + system: steadier than wall time on a shared
machine) and the peak resident memory of the process.

Set REALFLOW_CACHE to an empty directory to include the built-in SFT in the first run's time.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

KEY = {
    "sft": "loss",
    "rw": "acc",
    "dpo": "reward_acc",
    "ppo": "reward/mean",
    "grpo": "reward/mean",
    "rloo": "reward/mean",
    "reinforce_pp": "reward/mean",
    # dapo trains on the groups its sampling loop kept: the reward of every answer it generated
    "dapo": "rew_inf/rewards/mean",
}


def run_one(exp: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "realflow.quickstart", exp, f"output_dir={out}", "progress_bar=false"]
    t0 = time.time()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, cpu0 = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kb, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{exp} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    n = max(1, len(rows) // 10)
    key = KEY[exp]
    first = sum(r[key] for r in rows[:n]) / n
    last = sum(r[key] for r in rows[-n:]) / n
    step_s = sum(r["time/step_s"] for r in rows) / len(rows)
    return {
        "exp": exp, "steps": len(rows), "key": key, "first": first, "last": last,
        "step_s": step_s, "wall_s": wall, "cpu_s": cpu,
        # ru_maxrss of children is the max over all children so far: exact for the first run,
        # an upper bound for later ones unless they grow past it.
        "peak_rss_mib": max(peak_kb, before) / 1024,
    }


def main() -> None:
    exps = sys.argv[1:] or list(KEY)
    root = tempfile.mkdtemp(prefix="realflow-bench-defaults-")
    print(
        f"{'exp':<13}{'steps':>6}  {'metric':<21}{'first 10%':>10}{'last 10%':>10}{'step s':>8}"
        f"{'wall s':>8}{'cpu s':>8}{'peak MiB':>10}"
    )
    for exp in exps:
        r = run_one(exp, os.path.join(root, exp))
        print(
            f"{r['exp']:<13}{r['steps']:>6}  {r['key']:<21}{r['first']:>10.3f}{r['last']:>10.3f}"
            f"{r['step_s']:>8.3f}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}{r['peak_rss_mib']:>10.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
