"""Execution-plan search: large-cluster predictions, and validation against real runs here.

    .venv/bin/python benchmarks/bench_search.py large [--budget 40]
    .venv/bin/python benchmarks/bench_search.py validate [--steps 6]

`large`: PPO with actor, critic, ref and reward models of one size (llama-70b on 128 H100,
llama-7b on 16 and on 1024 H100; published-spec profiles), prompt 1024 + answer 1024 tokens:
each baseline's and the searched plan's simulated step time, peak memory, and the search's
time (and when it found its best plan).

`validate`: real PPO runs of this repository on this machine (mode=local, one torch thread,
so every model call runs on one compute thread: the plan is every MFC on one device) against
the simulator with the measured `cpu` profile: step time (median of the steps after the
first two) and each MFC's mean call time from trace.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile

from realflow.search import cost, search
from realflow.search.cli import SearchConfig, build_problem
from realflow.search.simulate import simulate


def _ppo(overrides: list[str]):
    from realflow.api.config import apply_overrides
    from realflow.experiments.ppo import PPOConfig

    return apply_overrides(PPOConfig, overrides)


def large(budget: float, max_nodes: int) -> None:
    cases = [
        ("llama-70b", 16, 512),
        ("llama-7b", 2, 512),
        ("llama-7b", 128, 16384),
    ]
    cases = [c for c in cases if c[1] <= max_nodes]
    load = os.getloadavg()[0]
    print(f"# {datetime.date.today()} {socket.gethostname()}, budget {budget:.0f} s, "
          f"load average {load:.1f} on {os.cpu_count()} cores\n")  # fmt: skip
    print("| model | GPUs | n_seqs | plan | step s | peak GB | vs best baseline |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, nodes, n_seqs in cases:
        cfg = _ppo([f"n_seqs={n_seqs}", "ppo.ppo_n_minibatches=4", "reward.scorers=[model]"])
        scfg = SearchConfig(
            cluster="h100x8", nodes=nodes, prompt_len=1024, gen_len=1024,
            models={r: model for r in ("actor", "critic", "ref", "rew")},
        )  # fmt: skip
        problem, dfg = build_problem(cfg, scfg)
        results = search.baselines(problem)
        found = search.search(problem, budget_s=budget)
        sims = {r.name: simulate(problem, r.plan, dfg) for r in [*results, found]
                if r.step_time_s < search.INF}  # fmt: skip
        best_base = min((sims[r.name].step_time_s for r in results if r.name in sims),
                        default=float("inf"))  # fmt: skip
        for r in [*results, found]:
            if r.name not in sims:
                print(f"| {model} | {problem.cluster.n_devices} | {n_seqs} | {r.name} | OOM | | |")
                continue
            s = sims[r.name]
            peak = max(s.peak_memory.values()) / 1e9
            print(f"| {model} | {problem.cluster.n_devices} | {n_seqs} | {r.name} | "
                  f"{s.step_time_s:.2f} | {peak:.1f} | {s.step_time_s / best_base:.2f}x |")  # fmt: skip
        chain, joint = lower_bounds(problem)
        print(f"| {model} | {problem.cluster.n_devices} | {n_seqs} | lower bound: chain / "
              f"chain + devices | {chain:.2f} / {joint:.2f} | | {chain / best_base:.2f}x / "
              f"{joint / best_base:.2f}x |")  # fmt: skip
        print(f"| | | | search: {found.seconds:.1f} s wall ({found.cpu_s:.1f} s CPU), "
              f"{found.evaluations} plans, best after {found.found_at_s:.1f} s | | | |")  # fmt: skip
        plan = ", ".join(f"{k}={v}" for k, v in found.plan.items())
        print(f"| | | | plan: {plan} | | | |")


def _fastest(problem, name: str) -> list[tuple[int, float]]:
    """(devices, seconds) of MFC `name`'s fastest layout that fits its own memory, per range
    size the search can give it."""
    from realflow.search.plan import Placement

    limit = problem.dev.memory * cost.USABLE_MEMORY
    out = []
    for n in sorted({n for _, n in problem.ranges()}):
        times = [problem.time(name, Placement(lay, 0)) for lay in problem.layouts(name, n)
                 if search._own_bytes(problem, name, Placement(lay, 0)) <= limit]  # fmt: skip
        if times:
            out.append((n, min(times)))
    return out


def lower_bounds(problem) -> tuple[float, float]:
    """Two lower bounds on the step time of any plan of a PPO-like graph (generate, then
    inference calls, then the train_steps) under the version rule, from the per-call times
    alone (reallocs, memory shared between MFCs and the master's dispatch order relaxed):
    - chain: generation(t) -> every inference of t -> the generator's train_step(t) ->
      generation(t + 1) is sequential, each call at its fastest, the inferences side by side;
    - chain and devices: also every call's device-seconds fit in the step on the cluster, and
      the inferences' within the window between generation and the train step; minimised
      over every MFC's device count."""
    n_dev = problem.cluster.n_devices
    by_kind = {k: [t.name for t in problem.tasks if t.kind == k and t.model is not None]
               for k in ("generate", "inference", "train_step")}  # fmt: skip
    (gen,) = by_kind["generate"]
    train = problem.trainer[problem.by_name[gen].role]
    opts = {m: _fastest(problem, m) for m in search.searched(problem)}
    infs = by_kind["inference"]
    chain = (min(t for _, t in opts[gen]) + max(min(t for _, t in opts[m]) for m in infs)
             + min(t for _, t in opts[train]))  # fmt: skip
    other_work = sum(min(n * t for n, t in opts[m]) for m in by_kind["train_step"] if m != train)
    windows = []  # (window seconds, inference device-seconds) of every combination
    for combo in itertools.product(*(opts[m] for m in infs)):
        work = sum(n * t for n, t in combo)
        windows.append((max(max(t for _, t in combo), work / n_dev), work))
    joint = float("inf")
    for ng, tg in opts[gen]:
        for na, ta in opts[train]:
            for win, work in windows:
                total = (ng * tg + na * ta + other_work + work) / n_dev
                joint = min(joint, max(tg + win + ta, total))
    return chain, joint


def _real_run(overrides: list[str], steps: int, mode: str) -> tuple[float, dict[str, float]]:
    """(median step_s after the first two steps, mean call seconds per MFC after step 1)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "realflow.quickstart", "ppo", *overrides,
               f"total_steps={steps}", f"output_dir={d}/run", "tensorboard=false",
               "progress_bar=false", f"mode={mode}"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        with open(f"{d}/run/metrics.jsonl") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(f"{d}/run/trace.json") as f:
            events = json.load(f)["traceEvents"]
    step_s = statistics.median(r["time/step_s"] for r in rows[2:])
    calls: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e["args"].get("step", 0) > 1 and "step" in e["args"]:
            calls.setdefault(e["name"], []).append(e["dur"] / 1e6)
    answer = statistics.mean(r.get("actor_gen/answer_len/mean", 0) for r in rows)
    return step_s, {k: statistics.mean(v) for k, v in calls.items()} | {"_answer": answer}


# Where each role runs: every role on worker 0 (mode=local runs model calls one after another
# on 2 cores anyway), or actor on worker 0 and critic + ref on worker 1 (mode=ray: two
# processes, one core each).
ONE = {"actor": 0, "critic": 0, "ref": 0, "rew": 0}
TWO = {"actor": 0, "critic": 1, "ref": 1, "rew": 1}


def validate(steps: int, model_dir: str, ray: bool) -> None:
    cases = [
        ("builtin:tiny", 16, 16, ONE, "local"),
        ("builtin:tiny", 64, 16, ONE, "local"),
        ("builtin:tiny", 32, 48, ONE, "local"),
        (model_dir, 16, 16, ONE, "local"),
        (model_dir, 32, 32, ONE, "local"),
    ]
    if ray:
        cases += [(model_dir, 16, 16, TWO, "ray"), ("builtin:tiny", 32, 32, TWO, "ray")]
    print("| model | n_seqs | gen | workers | MFC | measured s | predicted s | error |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for path, n_seqs, gen, where, mode in cases:
        overrides = [f"actor.path={path}", f"n_seqs={n_seqs}", f"ppo.gen.max_new_tokens={gen}",
                     f"ppo.gen.min_new_tokens={gen}"]  # fmt: skip
        overrides += [f"allocation.{role}={w}" for role, w in where.items()]
        measured_step, calls = _real_run(overrides, steps, mode)
        cfg = _ppo(overrides)
        scfg = SearchConfig(cluster="cpu2", prompt_len=10, gen_len=gen)
        problem, dfg = build_problem(cfg, scfg)
        from realflow.parallel.layout import Layout
        from realflow.search.plan import Placement

        plan = {t.name: Placement(Layout(), where[t.role]) for t in problem.tasks}
        sim = simulate(problem, plan, dfg, n_steps=steps)
        name = "tiny (h64 l2)" if path.startswith("builtin") else "h256 l4"
        name = f"{name} | {n_seqs} | {gen} | {len(set(where.values()))} ({mode})"
        for t in problem.tasks:
            if t.model is None or t.name not in calls:
                continue
            pred = problem.time(t.name, plan[t.name])
            err = pred / calls[t.name] - 1
            print(f"| {name} | {t.name} | {calls[t.name]:.3f} | {pred:.3f} | "
                  f"{err:+.0%} |")  # fmt: skip
        err = sim.step_time_s / measured_step - 1
        print(f"| {name} | **step** | {measured_step:.3f} | "
              f"{sim.step_time_s:.3f} | {err:+.0%} |")  # fmt: skip


def _model_dir(path: str) -> str:
    """An HF directory of a random llama with hidden 256 and 4 layers (built-in tokenizer)."""
    if os.path.isdir(path):
        return path
    import torch

    from realflow.data.tokenizer import load_tokenizer
    from realflow.models.builtin import builtin_config
    from realflow.models.hf_io import save_hf
    from realflow.models.transformer import PackedTransformer

    tok = load_tokenizer("builtin")
    torch.manual_seed(0)
    cfg = builtin_config("tiny-llama", len(tok), hidden_size=256, n_layers=4, n_heads=8,
                         n_kv_heads=8, intermediate_size=704)  # fmt: skip
    save_hf(PackedTransformer(cfg, head="lm"), path, tokenizer=tok)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("what", choices=("large", "validate"))
    p.add_argument("--budget", type=float, default=40.0)
    p.add_argument("--max-nodes", type=int, default=128, help="skip larger clusters")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--model-dir", default="/tmp/realflow_bench_search_h256")
    p.add_argument("--ray", action="store_true", help="also two-worker runs in mode=ray")
    args = p.parse_args()
    if args.what == "large":
        large(args.budget, args.max_nodes)
    else:
        validate(args.steps, _model_dir(args.model_dir), args.ray)


if __name__ == "__main__":
    main()
