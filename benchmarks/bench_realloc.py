"""Parameter reallocation throughput against raw point-to-point bandwidth, in one gloo run.

    .venv/bin/python benchmarks/bench_realloc.py [--hidden 768 --layers 6 --vocab 32000]
        [--world 4] [--repeats 3] [--ops auto|torch]

For each pair of meshes the workers build their (uninitialised) shards, plan the realloc and run
it `--repeats` times; the time of one realloc is the slowest worker's. Columns:

- `moved MB`: bytes that cross between workers (local copies are not counted);
- `realloc GB/s`: moved bytes / realloc time (planning excluded: plans are computed once);
- `raw same GB/s`: the same bytes between the same workers, one message per worker pair from
  ready contiguous buffers (no gather / scatter): what the transport gives for this pattern;
- `raw p2p GB/s`: one worker sending one tensor of the moved size to another;
- `% same`, `% p2p`: realloc throughput as a fraction of those, the median over repeats of the
  ratio of back-to-back runs (the machine's load moves all three columns together).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realflow.models.config import TransformerConfig  # noqa: E402
from realflow.models.transformer import PackedTransformer  # noqa: E402
from realflow.parallel import ops  # noqa: E402
from realflow.parallel.flat import FlatParams  # noqa: E402
from realflow.parallel.layout import Mesh  # noqa: E402
from realflow.parallel.partition import ShardSpec  # noqa: E402
from realflow.parallel.realloc import ReallocPlan, execute_realloc, plan_realloc  # noqa: E402

# Source and destination on disjoint workers, so every byte crosses between workers (where they
# overlap, the local copies would be timed but not counted). --world 2 runs the first only.
PAIRS = [
    ("d1t1p1@0", "d1t1p1@1"),
    ("d1t1p1@0", "d1t2p1@1-2"),
    ("d1t2p1@0-1", "d2t1p1@2-3"),
    ("d1t2p1@0-1", "d1t1p2@2-3"),
    ("d1t1p2@0-1", "d1t2p1@2-3"),
    ("d2t1p1@0-1", "d1t2p1@2-3"),
]


def model_config(args) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        n_layers=args.layers,
        n_heads=args.hidden // 64,
        n_kv_heads=args.hidden // 128,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
    )


def shard(config: TransformerConfig, mesh: Mesh, rank: int) -> FlatParams | None:
    if rank not in mesh:
        return None
    c, lay = mesh.coords(rank), mesh.layout
    spec = ShardSpec(tp_rank=c.tp, tp_size=lay.tp, pp_stage=c.pp, pp_size=lay.pp)
    return FlatParams(PackedTransformer(config, "lm", spec, init_weights=False))


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def timed(fns: list, repeats: int) -> list[list[float]]:
    """The slowest worker's time of each of `fns`, `repeats` times (after one warm-up each);
    the functions take turns, so a change of machine load hits neighbouring runs alike."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            dist.barrier()
            start = time.perf_counter()
            fn()
            out.append(slowest(time.perf_counter() - start))
    return times


def raw_same(plan: ReallocPlan, rank: int, dtype: torch.dtype):
    """A function sending each worker pair's bytes of the plan as one message from a ready
    contiguous buffer."""
    msgs = [t for t in plan.transfers if t.src != t.dst and rank in (t.src, t.dst)]
    bufs = [torch.empty(t.numel, dtype=dtype) for t in msgs]

    def run():
        p2p = [
            dist.P2POp(
                dist.isend if t.src == rank else dist.irecv, b, t.dst if t.src == rank else t.src
            )
            for t, b in zip(msgs, bufs)
        ]
        for w in dist.batch_isend_irecv(p2p) if p2p else []:
            w.wait()

    return run


def raw_p2p(numel: int, rank: int, dtype: torch.dtype):
    buf = torch.empty(numel, dtype=dtype)

    def run():
        if rank == 0:
            dist.send(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)

    return run


def measure(config: TransformerConfig, a: str, b: str, rank: int, repeats: int) -> tuple:
    """(moved bytes, realloc B/s, raw same B/s, raw p2p B/s, realloc / raw same, realloc / raw
    p2p) of one pair of meshes: medians; the ratios are medians of back-to-back pairs of runs."""
    src, dst = Mesh.parse(a), Mesh.parse(b)
    plan = plan_realloc(config, "lm", src, dst)
    s_flat, d_flat = shard(config, src, rank), shard(config, dst, rank)
    moved = plan.remote_numel() * 4
    t_realloc, t_same, t_p2p = timed(
        [
            lambda: execute_realloc(plan, s_flat, d_flat),
            raw_same(plan, rank, torch.float32),
            raw_p2p(plan.remote_numel(), rank, torch.float32),
        ],
        repeats,
    )
    med = statistics.median
    return (
        moved,
        moved / med(t_realloc),
        moved / med(t_same),
        moved / med(t_p2p),
        med(s / r for r, s in zip(t_realloc, t_same)),
        med(p / r for r, p in zip(t_realloc, t_p2p)),
    )


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    config = model_config(args)
    rows = []
    for a, b in PAIRS:
        if max(Mesh.parse(a).workers + Mesh.parse(b).workers) < world:
            rows.append((a, b, *measure(config, a, b, rank, args.repeats)))
    if rank == 0:
        print_table(args, rows)
    dist.barrier()
    dist.destroy_process_group()


def print_table(args, rows) -> None:
    ext = "csrc" if ops.extension() is not None else "torch fallback"
    print(
        f"model: llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} (fp32); "
        f"world {args.world} (gloo); interval ops: {ext}; median of {args.repeats}"
    )
    print("| from | to | moved MB | realloc GB/s | raw same GB/s | raw p2p GB/s | % same | % p2p |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for a, b, moved, r, same, p2p, f_same, f_p2p in rows:
        print(
            f"| {a} | {b} | {moved / 1e6:.0f} | {r / 1e9:.2f} | {same / 1e9:.2f} | "
            f"{p2p / 1e9:.2f} | {100 * f_same:.0f}% | {100 * f_p2p:.0f}% |"
        )


def bench_interval_ops(config: TransformerConfig, repeats: int) -> None:
    """Packing speed of one realloc message (the one with the most intervals) per implementation."""
    plan = plan_realloc(config, "lm", Mesh.parse("d1t2p1@0-1"), Mesh.parse("d1t1p2@2-3"))
    t = max(plan.transfers, key=lambda t: t.lengths.numel())
    src = torch.randn(plan.src_numel[t.src])
    out = torch.empty(t.numel)
    packed = torch.cumsum(t.lengths, 0) - t.lengths
    impls = {"torch fallback": ops.torch_copy_intervals}
    if ops.extension() is not None:
        impls["csrc"] = ops.extension().copy_intervals
    print(f"packing one message: {t.lengths.numel()} intervals, {t.numel * 4 / 1e6:.0f} MB")
    for name, fn in impls.items():
        fn(out, packed, src, t.src_offsets, t.lengths)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(out, packed, src, t.src_offsets, t.lengths)
            times.append(time.perf_counter() - start)
        print(f"  {name}: {t.numel * 4 / statistics.median(times) / 1e9:.2f} GB/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ops", choices=["auto", "torch"], default="auto")
    args = p.parse_args()
    if args.ops == "torch":
        os.environ["REALFLOW_INTERVAL_OPS"] = "torch"
    torch.set_num_threads(1)
    bench_interval_ops(model_config(args), args.repeats)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world, port, args), nprocs=args.world)


if __name__ == "__main__":
    main()
