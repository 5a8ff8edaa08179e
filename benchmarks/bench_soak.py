"""Soak test: long tiny PPO runs, looking for leaks. Not a test (minutes of CPU).

    .venv/bin/python benchmarks/bench_soak.py                 # 2000 steps local, 500 steps ray
    .venv/bin/python benchmarks/bench_soak.py --local 300 --ray 0

Runs PPO on the built-in task with a tiny config (4 prompts x 8 new tokens per step) through
`realflow.system.runner.run` and samples, every `--every` steps, the resident memory (RSS) and
the open file descriptors of every process of the run: this one, plus the Ray worker actors in
mode=ray. Growth is measured after a warm-up (the first 10% of steps: allocator pools, lazy
imports, the first checkpoint): mean of the last 10% of samples against the mean of the first
10% after warm-up. The goal is under 5% for RSS, and no growth in open files.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import psutil

from realflow.experiments.ppo import PPOConfig
from realflow.system import observe, runner


def tiny_ppo(output_dir: str, steps: int, mode: str) -> PPOConfig:
    cfg = PPOConfig(
        output_dir=output_dir,
        total_steps=steps,
        n_seqs=4,
        mode=mode,
        save_freq_steps=max(1, steps // 4),  # checkpoints are part of a long run
        keep_last_n_checkpoints=1,
        tensorboard=True,
        progress_bar=False,
    )
    cfg.ppo.gen.max_new_tokens = 8
    cfg.ppo.ppo_n_minibatches = 1
    return cfg


def sample(pids: list[int]) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) summed over `pids`."""
    rss, fds = 0, 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            rss += p.memory_info().rss
            fds += p.num_fds()
        except psutil.NoSuchProcess:
            continue
    return rss / 2**20, fds


def soak(mode: str, steps: int, every: int) -> dict[str, Any]:
    samples: list[tuple[int, float, int]] = []
    transports: list[Any] = []
    make = runner.make_transport

    def keep_transport(cfg: Any) -> Any:
        transports.append(make(cfg))
        return transports[-1]

    write = observe.MetricsWriter.write

    def write_and_sample(self: Any, step: int, *args: Any, **kwargs: Any) -> Any:
        row = write(self, step, *args, **kwargs)
        if step % every == 0:
            pids = [os.getpid(), *getattr(transports[-1], "pids", [])]
            rss, fds = sample(pids)
            samples.append((step, rss, fds))
        return row

    runner.make_transport = keep_transport
    observe.MetricsWriter.write = write_and_sample
    try:
        t0 = time.time()
        out = tempfile.mkdtemp(prefix=f"realflow-soak-{mode}-")
        runner.run("ppo", tiny_ppo(out, steps, mode))
        wall = time.time() - t0
    finally:
        runner.make_transport = make
        observe.MetricsWriter.write = write
    after = [s for s in samples if s[0] > steps // 10]
    n = max(1, len(after) // 10)
    rss_warm = statistics.mean(s[1] for s in after[:n])
    rss_end = statistics.mean(s[1] for s in after[-n:])
    return {
        "mode": mode,
        "steps": steps,
        "wall_s": wall,
        "rss_warm": rss_warm,
        "rss_end": rss_end,
        "rss_growth_pct": 100 * (rss_end - rss_warm) / rss_warm,
        "rss_max": max(s[1] for s in samples),
        "fds_warm": after[0][2],
        "fds_end": after[-1][2],
        "fds_max": max(s[2] for s in after),
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", type=int, default=2000, help="steps in mode=local (0: skip)")
    parser.add_argument("--ray", type=int, default=500, help="steps in mode=ray (0: skip)")
    parser.add_argument("--every", type=int, default=10, help="sample every N steps")
    args = parser.parse_args()
    print(
        f"{'mode':<6}{'steps':>6}{'wall s':>8}{'RSS warm':>10}{'RSS end':>9}{'growth':>8}"
        f"{'RSS max':>9}{'fds warm':>9}{'fds end':>8}{'fds max':>8}"
    )
    for mode, steps in (("local", args.local), ("ray", args.ray)):
        if steps <= 0:
            continue
        r = soak(mode, steps, args.every)
        print(
            f"{r['mode']:<6}{r['steps']:>6}{r['wall_s']:>8.0f}{r['rss_warm']:>10.0f}"
            f"{r['rss_end']:>9.0f}{r['rss_growth_pct']:>7.1f}%{r['rss_max']:>9.0f}"
            f"{r['fds_warm']:>9}{r['fds_end']:>8}{r['fds_max']:>8}",
            flush=True,
        )
        trace = " ".join(
            f"{s}:{rss:.0f}/{fd}" for s, rss, fd in r["samples"][:: max(1, len(r["samples"]) // 12)]
        )
        print(f"       step:RSS MiB/fds  {trace}", flush=True)


if __name__ == "__main__":
    main()
