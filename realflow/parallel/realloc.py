"""Parameter reallocation: move a model's weights from one mesh (layout + workers) to another.

    plan = plan_realloc(config, head, src_mesh, dst_mesh)     # the same on every worker
    stats = execute_realloc(plan, src_flat, dst_flat)          # every worker of either mesh

Planner: every worker of a mesh holds, for each full parameter, one block (`Rect`) at a known
offset of its flat buffer (realflow.parallel.flat). For each destination block the planner
intersects it with the source blocks of the same parameter; each intersection becomes intervals
(source offset, destination offset, length) between one source worker and that destination.
When several source workers hold the same block (data-parallel replicas, replicated
parameters), a destination reads it from itself when it can, otherwise the pieces are spread
over the replicas. Intervals that follow each other in both buffers are merged, so a layout
change that keeps a shard's layout moves one interval per peer.

Executor: one message per (source, destination) pair, sent with p2p (batch_isend_irecv) over
the workers' process group (gloo on CPU, NCCL on GPU); pieces are gathered / scattered with the
interval ops of realflow.parallel.ops (csrc/ when built). Copies within a worker are local.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from realflow.models.config import TransformerConfig
from realflow.parallel import ops
from realflow.parallel.flat import FlatParams, Slot, cached_slots, config_key
from realflow.parallel.layout import Mesh
from realflow.parallel.partition import Rect, check_layout

logger = logging.getLogger(__name__)


@dataclass
class Transfer:
    """Intervals (int64, elements) copied from worker `src`'s flat buffer to worker `dst`'s."""

    src: int
    dst: int
    src_offsets: torch.Tensor
    dst_offsets: torch.Tensor
    lengths: torch.Tensor

    @property
    def numel(self) -> int:
        return int(self.lengths.sum())


@dataclass
class ReallocPlan:
    """Every transfer of one reallocation, and the flat sizes both meshes expect."""

    src: Mesh
    dst: Mesh
    transfers: list[Transfer]
    src_numel: dict[int, int]
    dst_numel: dict[int, int]
    _by_rank: dict[int, list[Transfer]] = field(default_factory=dict, repr=False)

    def involving(self, rank: int) -> list[Transfer]:
        if not self._by_rank:
            for t in self.transfers:
                self._by_rank.setdefault(t.src, []).append(t)
                if t.dst != t.src:
                    self._by_rank.setdefault(t.dst, []).append(t)
        return self._by_rank.get(rank, [])

    def remote_numel(self) -> int:
        """Elements that cross between workers."""
        return sum(t.numel for t in self.transfers if t.src != t.dst)

    def local_numel(self) -> int:
        return sum(t.numel for t in self.transfers if t.src == t.dst)

    def describe(self) -> str:
        n_msgs = sum(1 for t in self.transfers if t.src != t.dst)
        return (
            f"realloc {self.src} -> {self.dst}: {n_msgs} messages, {self.remote_numel()} elements "
            f"between workers, {self.local_numel()} copied locally"
        )


def _mesh_slots(config: TransformerConfig, head: str, mesh: Mesh) -> dict[int, list[Slot]]:
    lay, key = mesh.layout, config_key(config)
    out = {}
    for w in mesh.workers:
        c = mesh.coords(w)
        out[w] = list(cached_slots(key, head, lay.tp, lay.pp, c.tp, c.pp))
    return out


def _intervals(s: Slot, d: Slot, part: Rect) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src offsets, dst offsets, lengths) of block `part` inside slots `s` and `d`."""
    sr, dr = s.rect, d.rect
    s0 = s.offset + (part.r0 - sr.r0) * sr.cols + (part.c0 - sr.c0)
    d0 = d.offset + (part.r0 - dr.r0) * dr.cols + (part.c0 - dr.c0)
    if part.cols == sr.cols == dr.cols:  # whole rows on both sides: one interval
        one = torch.tensor
        return one([s0]), one([d0]), one([part.numel])
    rows = torch.arange(part.rows, dtype=torch.int64)
    return s0 + rows * sr.cols, d0 + rows * dr.cols, torch.full_like(rows, part.cols)


def _coalesce(src: torch.Tensor, dst: torch.Tensor, lengths: torch.Tensor):
    """Merge neighbours that are contiguous in both buffers."""
    if src.numel() <= 1:
        return src, dst, lengths
    cont = (src[1:] == src[:-1] + lengths[:-1]) & (dst[1:] == dst[:-1] + lengths[:-1])
    starts = torch.cat([torch.tensor([True]), ~cont])
    seg = torch.cumsum(starts.long(), 0) - 1
    merged = torch.zeros(int(starts.sum()), dtype=torch.int64).index_add_(0, seg, lengths)
    return src[starts], dst[starts], merged


def _pick_source(
    holders: list[tuple[int, Slot]], src: Mesh, dst: Mesh, worker: int, k: int, n_slots: int
) -> tuple[int, Slot]:
    """Which of the source workers holding one block sends it to `worker` (for its k-th of
    `n_slots` parameters): the worker itself; else, when both layouts split the model alike, a
    holder at the same (tp, pp) coordinates, whose buffer is laid out like the destination's so
    the pieces merge into long intervals (with more source than destination replicas, each
    destination takes consecutive parameters from each replica in turn); else the holders in
    turn."""
    for h in holders:
        if h[0] == worker:
            return h
    c = dst.coords(worker)
    if (src.layout.tp, src.layout.pp) == (dst.layout.tp, dst.layout.pp):
        alike = [h for h in holders if src.coords(h[0])[1:] == (c.tp, c.pp)]
        if alike:
            share = k * len(alike) // n_slots if src.layout.dp > dst.layout.dp else 0
            return alike[(c.dp + share) % len(alike)]
    return holders[(dst.workers.index(worker) + k) % len(holders)]


def plan_realloc(config: TransformerConfig, head: str, src: Mesh, dst: Mesh) -> ReallocPlan:
    """The transfers that rebuild `dst`'s shards from `src`'s (deterministic: every worker can
    compute it alone). `head` is the model's head ("lm", "critic", "reward")."""
    check_layout(config, src.layout)
    check_layout(config, dst.layout)
    src_slots, dst_slots = _mesh_slots(config, head, src), _mesh_slots(config, head, dst)
    holders: dict[str, dict[Rect, list[tuple[int, Slot]]]] = defaultdict(dict)
    for w in src.workers:
        for s in src_slots[w]:
            holders[s.key].setdefault(s.rect, []).append((w, s))
    pieces: dict[tuple[int, int], list] = defaultdict(list)
    for w in dst.workers:
        for k, d in enumerate(dst_slots[w]):
            covered = 0
            for rect, hs in holders[d.key].items():
                part = rect.intersect(d.rect)
                if part is None:
                    continue
                src_w, s = _pick_source(hs, src, dst, w, k, len(dst_slots[w]))
                pieces[(src_w, w)].append(_intervals(s, d, part))
                covered += part.numel
            if covered != d.numel:
                raise AssertionError(f"{d.key}: source blocks cover {covered} of {d.numel}")
    transfers = []
    for (s_w, d_w), parts in pieces.items():
        so, do, ln = (torch.cat(x) for x in zip(*parts))
        transfers.append(Transfer(s_w, d_w, *_coalesce(so, do, ln)))
    return ReallocPlan(
        src=src,
        dst=dst,
        transfers=transfers,
        src_numel={w: sum(s.numel for s in src_slots[w]) for w in src.workers},
        dst_numel={w: sum(s.numel for s in dst_slots[w]) for w in dst.workers},
    )


@dataclass
class ReallocStats:
    """What one worker moved: elements sent / received to / from other workers, copied
    locally, and the wall time of its part."""

    sent_bytes: int = 0
    recv_bytes: int = 0
    local_bytes: int = 0
    seconds: float = 0.0


def _check_flat(plan: ReallocPlan, rank: int, flat: FlatParams | None, which: str) -> None:
    mesh = plan.src if which == "source" else plan.dst
    expected = (plan.src_numel if which == "source" else plan.dst_numel).get(rank)
    if expected is None:
        return
    if flat is None:
        raise ValueError(f"worker {rank} is in the {which} mesh {mesh} but got no {which} params")
    if flat.numel != expected:
        raise ValueError(
            f"worker {rank}: {which} params have {flat.numel} elements, the plan for {mesh} "
            f"expects {expected} (a model of another config or layout?)"
        )


def execute_realloc(
    plan: ReallocPlan,
    src: FlatParams | None,
    dst: FlatParams | None,
    rank: int | None = None,
    group: Any = None,
    release_src: bool = False,
    wire_dtype: torch.dtype | None = None,
) -> ReallocStats:
    """Run this worker's part of `plan`: every worker of the source or destination mesh calls
    it (others may too: they return at once). `src` / `dst` are this worker's shards (None when
    it is not in that mesh); a released `dst` is allocated first. `release_src=True` frees the
    source shard afterwards (a copy no longer needed; keep the training copy).

    `wire_dtype` (the same on every worker) is the dtype sent: needed when source and
    destination dtypes differ (e.g. bfloat16 from an fp32 training copy to a bf16 generation
    copy, which also halves the bytes). None: each side uses its own dtype, which must agree."""
    rank = dist.get_rank() if rank is None else rank
    _check_flat(plan, rank, src, "source")
    _check_flat(plan, rank, dst, "destination")
    if wire_dtype is None and src is not None and dst is not None and src.dtype != dst.dtype:
        raise ValueError(
            f"source ({src.dtype}) and destination ({dst.dtype}) dtypes differ: pass wire_dtype "
            "(the same on every worker)"
        )
    start = time.perf_counter()
    stats = ReallocStats()
    if dst is not None and rank in plan.dst:
        dst.allocate()
    mine = plan.involving(rank)
    p2p, unpack = [], []
    for t in mine:
        if t.src == t.dst:
            continue
        if t.src == rank:
            buf = _pack(src.buffer, t.src_offsets, t.lengths, wire_dtype or src.dtype)
            p2p.append(dist.P2POp(dist.isend, buf, t.dst, group=group))
            stats.sent_bytes += buf.numel() * buf.element_size()
        else:
            buf, direct = _recv_buffer(dst, t, wire_dtype or dst.dtype)
            p2p.append(dist.P2POp(dist.irecv, buf, t.src, group=group))
            stats.recv_bytes += buf.numel() * buf.element_size()
            if not direct:
                unpack.append((t, buf))
    works = dist.batch_isend_irecv(p2p) if p2p else []
    for t in mine:  # local copies while the messages are in flight
        if t.src == t.dst == rank:
            _copy_local(src, dst, t, wire_dtype or src.dtype)
            stats.local_bytes += t.numel * dst.buffer.element_size()
    for w in works:
        w.wait()
    for t, buf in unpack:
        ops.scatter_intervals(dst.buffer, t.dst_offsets, t.lengths, buf.to(dst.dtype))
    if release_src and src is not None and src is not dst:
        src.release()
    stats.seconds = time.perf_counter() - start
    return stats


def _pack(
    buf: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    if offsets.numel() == 1:  # one interval: send the slice itself
        packed = buf.narrow(0, int(offsets[0]), int(lengths[0]))
    else:
        packed = ops.gather_intervals(buf, offsets, lengths)
    return packed.to(dtype)


def _recv_buffer(dst: FlatParams, t: Transfer, wire: torch.dtype) -> tuple[torch.Tensor, bool]:
    if t.dst_offsets.numel() == 1 and wire == dst.dtype:  # receive in place
        return dst.buffer.narrow(0, int(t.dst_offsets[0]), int(t.lengths[0])), True
    return torch.empty(t.numel, dtype=wire, device=dst.device), False


def _copy_local(src: FlatParams, dst: FlatParams, t: Transfer, wire: torch.dtype) -> None:
    """Copy within a worker, with the same casts as a message would go through."""
    if src.dtype == dst.dtype == wire:
        ops.copy_intervals(dst.buffer, t.dst_offsets, src.buffer, t.src_offsets, t.lengths)
    else:
        packed = ops.gather_intervals(src.buffer, t.src_offsets, t.lengths).to(wire).to(dst.dtype)
        ops.scatter_intervals(dst.buffer, t.dst_offsets, t.lengths, packed)
