"""Calibration: run real realflow model calls on this machine and fit a DeviceProfile.

    python -m realflow.search.calibrate                # full run (minutes): writes the profile
                                                      # profiles/cpu.yaml and clusters/cpu2.yaml
    python -m realflow.search.calibrate --toy --out-profile /tmp/p.yaml --out-cluster /tmp/c.yaml

What it measures, on the device torch picks (CPU here; the first GPU when present):
- peak matmul FLOP/s (square fp32 / bf16 matmuls) and memory bandwidth (a large copy);
- inference: `PackedTransformer` forward over packed batches of several shapes and sizes;
- train_step: forward + backward + an Adam step over the same batches;
- generate: `realflow.models.generation.generate` (prefill + decode) of several batch sizes;
- the link: gloo point-to-point between 2 processes (ping-pong), several message sizes.

The fit (`fit_profile`) is non-negative least squares on the cost model's own terms
(realflow/search/cost.py), so the fitted profile reproduces the measurements through the same
formulas the search uses; each measurement's relative error is logged and kept in the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import yaml

from realflow.parallel.layout import Layout
from realflow.search import cost
from realflow.search.spec import GB, DeviceProfile, Link, ModelSpec

logger = logging.getLogger(__name__)

BIG_MB = 1 << 30  # one micro-batch: calibration calls are not split


@dataclasses.dataclass(frozen=True)
class Sample:
    """One measured call: `seconds` for `work` on `model` (one device, layout d1t1p1)."""

    model: ModelSpec
    work: cost.Work
    seconds: float


def _features(s: Sample, peak: float, bw: float, param_bytes: int) -> list[float]:
    """Coefficients of [call_s, 1/infer_eff, 1/train_eff, layer_s, decode_step_s,
    1/decode_bw_eff] in the cost model's time of `s` on one device (decode memory-bound)."""
    m, w = s.model, s.work
    b = w.n_seqs
    layers = m.n_layers
    if w.kind == "inference":
        flops = b * w.seq_len * m.fwd_flops_per_token(w.seq_len / 2)
        return [1.0, flops / peak, 0.0, layers, 0.0, 0.0]
    if w.kind == "train_step":
        passes = 3.0
        flops = passes * b * w.seq_len * m.fwd_flops_per_token(w.seq_len / 2)
        return [1.0, 0.0, flops / peak, passes * layers, 0.0, 0.0]
    prefill = b * w.prompt_len * m.fwd_flops_per_token(w.prompt_len / 2)
    ctx = w.prompt_len + w.gen_len / 2
    kv = b * ctx * 2 * layers * m.n_kv_heads * m.head_dim * param_bytes
    mem = m.params * param_bytes + kv
    return [1.0, prefill / peak, 0.0, layers * (1 + w.gen_len), w.gen_len, w.gen_len * mem / bw]


def _known_seconds(s: Sample, bw: float) -> float:
    """The part of the model's time with no fitted parameter: the Adam step's memory traffic."""
    if s.work.kind == "train_step":
        p = cost.device_params(s.model, Layout())
        return s.work.n_minibatches * p * DeviceProfile.optim_bytes_per_param / bw
    return 0.0


def fit_profile(
    samples: list[Sample], peak: float, bw: float, memory: float, param_bytes: int, source: str
) -> tuple[DeviceProfile, list[float]]:
    """The profile whose cost-model times best fit `samples` (non-negative least squares on
    relative errors), and each sample's relative error."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array([_features(s, peak, bw, param_bytes) for s in samples])
    y = np.array([s.seconds - _known_seconds(s, bw) for s in samples])
    weight = 1.0 / np.array([s.seconds for s in samples])  # relative error
    coef, _ = nnls(a * weight[:, None], y * weight)
    call_s, inv_inf, inv_train, layer_s, step_s, inv_bw = (float(c) for c in coef)
    peak, bw, memory = float(peak), float(bw), float(memory)

    def eff(inv: float) -> float:
        return 1.0 / inv if inv > 1e-12 else 1.0  # no measurable cost: as fast as peak

    profile = DeviceProfile(
        name="fitted", source=source, peak_flops=peak, mem_bandwidth=bw, memory=memory,
        param_bytes=param_bytes, train_eff=eff(inv_train), infer_eff=eff(inv_inf),
        decode_bw_eff=eff(inv_bw), call_s=call_s, decode_step_s=step_s, layer_s=layer_s,
    )  # fmt: skip
    links = cost.Links(*(Link("none", 1e18, 0.0),) * 3)
    errors = [
        cost.mfc_time(s.model, Layout(), s.work, profile, links) / s.seconds - 1.0 for s in samples
    ]
    return profile, errors


def fit_link(sizes: list[int], seconds: list[float], name: str) -> Link:
    """Latency + bytes / bandwidth through the measured one-way message times."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array([[1.0, float(n)] for n in sizes])
    w = 1.0 / np.array(seconds)
    (lat, inv_bw), _ = nnls(a * w[:, None], np.array(seconds) * w)
    return Link(name, float(1.0 / inv_bw) if inv_bw > 0 else 1e18, float(lat))


# ---- measuring ------------------------------------------------------------------------------------


def _best_of(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_device(device: str, reps: int) -> tuple[float, float]:
    """(peak FLOP/s of a square matmul, memory bandwidth of a large copy) on `device`."""
    import torch

    n = 1024
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    x = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def mm() -> None:
        for _ in range(4):
            x @ x
        sync()

    peak = 4 * 2 * n**3 / _best_of(mm, reps)
    big = torch.empty(64 * (1 << 20) // 4, device=device)
    dst = torch.empty_like(big)

    def copy() -> None:
        dst.copy_(big)
        sync()

    bw = 2 * big.numel() * 4 / _best_of(copy, reps)
    return peak, bw


def measure_calls(specs: list[ModelSpec], shapes: list[tuple[int, int, int]], device: str,
                  reps: int) -> list[Sample]:  # fmt: skip
    """Inference, train_step and generate of every model in `specs` for every (n_seqs,
    prompt_len, gen_len) in `shapes`, timed on `device`: `reps` rounds over all of them (after
    a warm-up call each), each call's best round kept, so a busy spell of a shared machine
    spoils one round of every call rather than every round of one call."""
    import torch

    from realflow.models.builtin import builtin_config
    from realflow.models.transformer import PackedTransformer

    calls = []  # (spec, shape, kind, fn)
    for spec in specs:
        cfg = builtin_config(
            "tiny-llama", spec.vocab_size, hidden_size=spec.hidden_size, n_layers=spec.n_layers,
            n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads,
            intermediate_size=spec.intermediate_size, max_position_embeddings=4096,
        )  # fmt: skip
        model = PackedTransformer(cfg, head="lm").to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        for shape in shapes:
            fns = _call_fns(model, opt, spec.vocab_size, *shape, device)
            calls.extend((spec, shape, kind, fn) for kind, fn in fns.items())
    best = [float("inf")] * len(calls)
    for _, _, _, fn in calls:
        fn()  # warm-up
    for _ in range(reps):
        for i, (_, _, _, fn) in enumerate(calls):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    out = []
    for (spec, (n_seqs, prompt, gen), kind, _), seconds in zip(calls, best, strict=True):
        work = cost.Work(kind, n_seqs, prompt, gen, max_tokens_per_mb=BIG_MB)
        out.append(Sample(spec, work, seconds))
        logger.info("%s %s b=%d s=%d+%d: %.4f s", spec.name, kind, n_seqs, prompt, gen, seconds)
    return out


def _call_fns(model: Any, opt: Any, vocab: int, n_seqs: int, prompt: int, gen: int,
              device: str) -> dict[str, Callable[[], None]]:  # fmt: skip
    """An inference, a train step and a generate call of `n_seqs` packed sequences."""
    import torch

    from realflow.models.generation import GenerationConfig, generate

    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    seq = prompt + gen
    ids = torch.randint(0, vocab, (n_seqs * seq,), device=device)
    cu = torch.arange(0, n_seqs * seq + 1, seq, device=device, dtype=torch.int32)
    p_ids = torch.randint(0, vocab, (n_seqs * prompt,), device=device)
    p_cu = torch.arange(0, n_seqs * prompt + 1, prompt, device=device, dtype=torch.int32)
    gcfg = GenerationConfig(max_new_tokens=gen, min_new_tokens=gen, greedy=True)

    def infer() -> None:
        with torch.no_grad():
            model(ids, cu)
        sync()

    def train() -> None:
        model(ids, cu).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    def gen_call() -> None:
        with torch.no_grad():
            generate(model, p_ids, p_cu, gcfg)
        sync()

    return {"inference": infer, "train_step": train, "generate": gen_call}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _p2p_worker(rank: int, port: int, sizes: list[int], reps: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    times = []
    for n in sizes:
        buf = torch.zeros(max(1, n // 4))
        best = float("inf")
        for _ in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            best = min(best, (time.perf_counter() - t0) / 2)
        times.append(best)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def measure_p2p(sizes: list[int], reps: int) -> list[float]:
    """One-way time of a gloo send of each size between 2 local processes (ping-pong / 2)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_p2p_worker, args=(r, port, sizes, reps, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    times = out.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    return times


# ---- real runs: what the runtime adds around the model ---------------------------------------

PROMPT_LEN = 10  # mean prompt tokens of the built-in reverse task (9.5)
RUN_CASES = [("h64l2", 32, 32), ("h128l4", 16, 24), ("h128l4", 48, 8)]
RUN_MODELS = {"h64l2": (64, 2, 4, 128), "h128l4": (128, 4, 4, 352), "h256l4": (256, 4, 8, 704)}
KIND_OF = {"actor_gen": "generate", "ref_inf": "inference", "critic_inf": "inference",
           "actor_train": "train_step", "critic_train": "train_step"}  # fmt: skip


def random_model_dir(name: str, root: str) -> tuple[str, ModelSpec]:
    """An HF directory of a random llama of RUN_MODELS[name] with the built-in tokenizer."""
    import torch

    from realflow.data.tokenizer import load_tokenizer
    from realflow.models.builtin import builtin_config
    from realflow.models.hf_io import save_hf
    from realflow.models.transformer import PackedTransformer

    h, n, heads, inter = RUN_MODELS[name]
    tok = load_tokenizer("builtin")
    spec = ModelSpec(name, n, h, heads, heads, inter, len(tok))
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        torch.manual_seed(0)
        cfg = builtin_config("tiny-llama", len(tok), hidden_size=h, n_layers=n, n_heads=heads,
                             n_kv_heads=heads, intermediate_size=inter)  # fmt: skip
        save_hf(PackedTransformer(cfg, head="lm"), path, tokenizer=tok)
    return path, spec


def run_ppo(overrides: list[str], steps: int, threads: int, mode: str = "local") -> dict[str, Any]:
    """Run `python -m realflow.quickstart ppo` for `steps` steps; returns the rows of
    metrics.jsonl and each MFC's call seconds after step 1 (from trace.json)."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "realflow.quickstart", "ppo", *overrides,
               f"total_steps={steps}", f"output_dir={d}/run", "tensorboard=false",
               "progress_bar=false", f"mode={mode}"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        with open(f"{d}/run/metrics.jsonl") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(f"{d}/run/trace.json") as f:
            events = json.load(f)["traceEvents"]
    calls: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("args", {}).get("step", 0) > 1:
            calls.setdefault(e["name"], []).append(e["dur"] / 1e6)
    return {"rows": rows, "calls": calls}


def measure_runs(root: str, threads: int) -> list[Sample]:
    """Real PPO runs (every role on one worker, mode=local): each MFC's median call time."""
    import statistics

    out = []
    for name, n_seqs, gen in RUN_CASES:
        path, spec = random_model_dir(name, root)
        run = run_ppo([f"actor.path={path}", f"n_seqs={n_seqs}", f"ppo.gen.max_new_tokens={gen}",
                       f"ppo.gen.min_new_tokens={gen}", *ALL_ON_ONE], 5, threads)  # fmt: skip
        for mfc, kind in KIND_OF.items():
            minibatches = 2 if kind == "train_step" else 1  # ppo.ppo_n_minibatches default
            work = cost.Work(kind, n_seqs, PROMPT_LEN, gen, n_minibatches=minibatches)
            seconds = statistics.median(run["calls"][mfc])
            out.append(Sample(spec, work, seconds))
            logger.info("run %s %s b=%d gen=%d: %.4f s", name, mfc, n_seqs, gen, seconds)
    return out


ALL_ON_ONE = [f"allocation.{r}=0" for r in ("actor", "critic", "ref", "rew")]


def fit_runtime(profile: DeviceProfile, runs: list[Sample]) -> DeviceProfile:
    """The profile with `runtime` (scale, call_s per kind) fitted to real runs: non-negative
    least squares of measured call time on [model time, 1], relative errors."""
    import numpy as np
    from scipy.optimize import nnls

    links = cost.Links(*(Link("none", 1e18, 0.0),) * 3)
    fitted = []
    for kind in ("generate", "inference", "train_step"):
        rows = [s for s in runs if s.work.kind == kind]
        if not rows:
            continue
        model_s = [cost.mfc_time(s.model, Layout(), s.work, profile, links) for s in rows]
        w = 1.0 / np.array([s.seconds for s in rows])
        a = np.array([[m, 1.0] for m in model_s]) * w[:, None]
        (scale, call), _ = nnls(a, np.array([s.seconds for s in rows]) * w)
        fitted.append((kind, round(float(scale), 4), round(float(call), 5)))
    return dataclasses.replace(profile, runtime=tuple(fitted))


# ---- the command ---------------------------------------------------------------------------------

FULL_MODELS = [(64, 2, 4, 128), (128, 4, 4, 352), (256, 4, 8, 704), (384, 6, 6, 1024)]
FULL_SHAPES = [(2, 16, 16), (8, 32, 16), (16, 48, 32), (32, 64, 16)]
TOY_MODELS = [(32, 1, 2, 64), (64, 2, 4, 128)]
TOY_SHAPES = [(2, 8, 4), (4, 16, 4)]


def calibrate(toy: bool, threads: int) -> tuple[DeviceProfile, Link, dict[str, Any]]:
    import torch

    from realflow.data.tokenizer import builtin_vocab

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    reps = 2 if toy else 5
    vocab = len(builtin_vocab())
    specs = [
        ModelSpec(f"h{h}l{n}", n, h, heads, heads, inter, vocab)
        for h, n, heads, inter in (TOY_MODELS if toy else FULL_MODELS)
    ]
    samples = measure_calls(specs, TOY_SHAPES if toy else FULL_SHAPES, device, reps)
    peak, bw = measure_device(device, 3 * reps)
    if device == "cpu":
        import psutil

        memory, param_bytes = psutil.virtual_memory().total / max(1, os.cpu_count() or 1), 4
    else:
        memory, param_bytes = torch.cuda.get_device_properties(0).total_memory, 2
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    source = f"measured: python -m realflow.search.calibrate{' --toy' if toy else ''} ({when}, "
    source += f"{device}, {threads} thread(s), {socket.gethostname()})"
    profile, errors = fit_profile(samples, peak, bw, memory, param_bytes, source)
    if not toy and device == "cpu":
        import tempfile

        with tempfile.TemporaryDirectory() as root:
            runs = measure_runs(root, threads)
        profile = fit_runtime(profile, runs)
    sizes = [1 << k for k in ((10, 16, 20) if toy else (10, 13, 16, 18, 20, 22, 24))]
    p2p = measure_p2p(sizes, reps)
    link = fit_link(sizes, p2p, "gloo-local")
    report = {
        "calls": len(samples),
        "max_abs_rel_err": round(float(max(abs(e) for e in errors)), 4),
        "rms_rel_err": round(float(sum(e * e for e in errors) / len(errors)) ** 0.5, 4),
        "samples": [
            {
                "model": dataclasses.asdict(s.model),
                "work": dataclasses.asdict(s.work),
                "seconds": round(s.seconds, 6),
                "rel_err": round(float(e), 4),
            }
            for s, e in zip(samples, errors, strict=True)
        ],  # fmt: skip
        "p2p": {"bytes": sizes, "seconds": [round(t, 7) for t in p2p]},
    }
    return profile, link, report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m realflow.search.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--toy", action="store_true", help="a few seconds: two tiny models")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one worker's share)")
    p.add_argument("--name", default="cpu", help="profile name")
    p.add_argument("--out-profile", default=os.path.join(here, "profiles", "cpu.yaml"))
    p.add_argument("--out-cluster", default=os.path.join(here, "clusters", "cpu2.yaml"))
    p.add_argument("--devices", type=int, default=2, help="devices of the written cluster")
    p.add_argument("--runtime-only", action="store_true",
                   help="keep --out-profile's model fit; measure and fit only the runtime's "
                        "share from real PPO runs")  # fmt: skip
    args = p.parse_args(argv)
    if args.runtime_only:
        return _runtime_only(args.out_profile, args.threads)
    profile, link, report = calibrate(args.toy, args.threads)
    d = dataclasses.replace(profile, name=args.name).to_dict()
    d["fit"] = report
    with open(args.out_profile, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    cluster = {
        "name": os.path.splitext(os.path.basename(args.out_cluster))[0],
        "source": profile.source,
        "nodes": 1,
        "devices_per_node": args.devices,
        "device": os.path.abspath(args.out_profile) if args.toy else args.name,
        "intra_node": _link_dict(link),
        "inter_node": _link_dict(link),
    }
    with open(args.out_cluster, "w") as f:
        yaml.safe_dump(cluster, f, sort_keys=False)
    summary = {k: v for k, v in report.items() if k not in ("samples", "p2p")}
    logger.info("fit: %s; link %s: %.3g GB/s, %.1f us", summary, link.name,
                link.bandwidth / GB, link.latency * 1e6)  # fmt: skip
    return 0


def _runtime_only(path: str, threads: int) -> int:
    import tempfile

    import torch

    from realflow.search.spec import load_profile

    torch.set_num_threads(threads)
    profile = dataclasses.replace(load_profile(path), runtime=())
    with tempfile.TemporaryDirectory() as root:
        runs = measure_runs(root, threads)
    profile = fit_runtime(profile, runs)
    with open(path) as f:
        d = yaml.safe_load(f)
    d["runtime"] = profile.to_dict()["runtime"]
    d["runtime_fit"] = {
        "command": f"python -m realflow.search.calibrate --runtime-only --threads {threads}",
        "runs": [
            {
                "model": s.model.name,
                "work": dataclasses.asdict(s.work),
                "seconds": round(s.seconds, 5),
            }
            for s in runs
        ],
    }
    with open(path, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    logger.info("runtime: %s", d["runtime"])
    return 0


def _link_dict(link: Link) -> dict[str, Any]:
    return {
        "name": link.name,
        "bandwidth_GBps": round(link.bandwidth / GB, 4),
        "latency_us": round(link.latency * 1e6, 2),
    }


if __name__ == "__main__":
    raise SystemExit(main())
