"""Parameter reallocation: move a model's weights from one mesh (layout + workers) to another.

    plan = plan_realloc(config, head, src_mesh, dst_mesh)     # the same on every worker
    stats = execute_realloc(plan, src_flat, dst_flat)          # every worker of either mesh

Planner: every worker of a mesh holds, for each full parameter, one block (`Rect`) at a known
offset of its flat buffer (realflow.parallel.flat). For each destination block the planner
intersects it with the source blocks of the same parameter; each intersection becomes intervals
(source offset, destination offset, length) between one source worker and that destination.
When several source workers hold the same block (data-parallel replicas, replicated
parameters), a destination reads it from itself when it can, else from a replica whose buffer
is laid out like its own, else from the replicas in turn. Intervals that follow each other in
both buffers are merged, so moving a layout to other workers is one interval per worker pair.

Executor: p2p over the workers' process group (gloo on CPU, NCCL on GPU). A long interval is a
message of its own, straight from the source buffer into the destination buffer; runs of short
ones (the rows of a column block) are packed into bounded messages with the interval ops of
realflow.parallel.ops (csrc/ when built), pipelined on gloo. Copies within a worker are local.
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
    # This process's messages and staging buffers, reused by the next run (release_staging).
    staging: dict = field(default_factory=dict, repr=False)

    def release_staging(self) -> None:
        """Free what the executor kept with the plan for its next run."""
        self.staging.clear()

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
    plan = ReallocPlan(
        src=src,
        dst=dst,
        transfers=transfers,
        src_numel={w: sum(s.numel for s in src_slots[w]) for w in src.workers},
        dst_numel={w: sum(s.numel for s in dst_slots[w]) for w in dst.workers},
    )
    logger.debug("%s", plan.describe())
    return plan


@dataclass
class ReallocStats:
    """What one worker moved: bytes sent / received to / from other workers, copied locally,
    and the wall time of its part."""

    sent_bytes: int = 0
    recv_bytes: int = 0
    local_bytes: int = 0
    seconds: float = 0.0


# Messages are cut into pieces of at most this many elements, so packing the next piece, the
# transfer of this one and unpacking the previous one overlap.
CHUNK_NUMEL = 1 << 22
SEND_SLOTS = 3  # pieces being packed or sent at once by one worker (gloo)


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


def _cut(t: Transfer, chunk: int) -> list[Transfer]:
    """`t` cut into consecutive pieces of at most `chunk` elements (intervals cut at the
    boundaries)."""
    total = t.numel
    if total <= chunk:
        return [t]
    ends = torch.cumsum(t.lengths, 0)
    starts = ends - t.lengths
    pieces = []
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        i0 = int(torch.searchsorted(ends, lo, right=True))
        i1 = int(torch.searchsorted(starts, hi, right=False))
        a = torch.clamp(starts[i0:i1], min=lo)  # the part of each interval inside [lo, hi)
        b = torch.clamp(ends[i0:i1], max=hi)
        skip = a - starts[i0:i1]
        pieces.append(
            Transfer(t.src, t.dst, t.src_offsets[i0:i1] + skip, t.dst_offsets[i0:i1] + skip, b - a)
        )
    return pieces


def split_transfer(t: Transfer, chunk: int, big: int | None = None) -> list[Transfer]:
    """The messages of transfer `t`, in order: an interval of at least `big` elements (default
    chunk / 16) travels alone, straight from the source buffer into the destination buffer;
    runs of smaller ones are packed together in messages of at most `chunk` elements. The same
    on the sending and the receiving side."""
    big = max(1, chunk // 16) if big is None else big
    is_big = (t.lengths >= big).tolist()
    pieces, i, n = [], 0, len(is_big)
    while i < n:
        j = i + 1
        while j < n and is_big[j] == is_big[i] and not is_big[i]:
            j += 1
        part = Transfer(t.src, t.dst, t.src_offsets[i:j], t.dst_offsets[i:j], t.lengths[i:j])
        pieces += [part] if is_big[i] else _cut(part, chunk)
        i = j
    return pieces


def execute_realloc(
    plan: ReallocPlan,
    src: FlatParams | None,
    dst: FlatParams | None,
    rank: int | None = None,
    group: Any = None,
    release_src: bool = False,
    wire_dtype: torch.dtype | None = None,
    chunk_numel: int = CHUNK_NUMEL,
) -> ReallocStats:
    """Run this worker's part of `plan`: every worker of the source or destination mesh calls
    it (others may too: they return at once). `src` / `dst` are this worker's shards (None when
    it is not in that mesh); a released `dst` is allocated first. `release_src=True` frees the
    source shard afterwards (a copy no longer needed; keep the training copy). `group` is the
    workers' process group (default: the world); worker ids are global ranks.

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
    if dst is not None and rank in plan.dst:
        dst.allocate()
    mine = plan.involving(rank)
    sends, recvs = _messages(plan, rank, chunk_numel)
    wire_in = wire_dtype or (dst.dtype if dst is not None else None)
    wire_out = wire_dtype or (src.dtype if src is not None else None)
    local = [t for t in mine if t.src == t.dst == rank]
    stats = ReallocStats()
    exchange = _exchange_pipelined if dist.get_backend(group) == "gloo" else _exchange_batched
    exchange(plan, sends, recvs, local, src, dst, wire_out, wire_in, group, stats)
    if release_src and src is not None and src is not dst:
        src.release()
    stats.seconds = time.perf_counter() - start
    return stats


def _messages(plan: ReallocPlan, rank: int, chunk: int) -> tuple[list, list]:
    """This worker's outgoing and incoming messages (cached with the plan)."""
    key = ("messages", rank, chunk)
    if key not in plan.staging:
        mine = plan.involving(rank)
        plan.staging[key] = (
            [p for t in mine if t.src == rank != t.dst for p in split_transfer(t, chunk)],
            [p for t in mine if t.dst == rank != t.src for p in split_transfer(t, chunk)],
        )
    return plan.staging[key]


def _tags(pieces: list[Transfer]) -> list[int]:
    """A tag per piece: its index among the pieces of the same (src, dst) pair."""
    seen: dict[tuple[int, int], int] = defaultdict(int)
    tags = []
    for p in pieces:
        tags.append(seen[(p.src, p.dst)])
        seen[(p.src, p.dst)] += 1
    return tags


def _staging(plan: ReallocPlan, kind: str, numel: int, dtype, device) -> torch.Tensor:
    """A buffer kept with the plan for its next run: fresh memory costs a page fault per page
    on CPU, which made packing several times slower than the copy itself."""
    key = (kind, dtype, str(device))
    buf = plan.staging.get(key)
    if buf is None or buf.numel() < numel:
        buf = plan.staging[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _exchange_pipelined(plan, sends, recvs, local, src, dst, wire_out, wire_in, group, stats):
    """gloo: every receive is posted first; each piece is sent as soon as it is packed (into
    one of SEND_SLOTS reused buffers); received pieces are unpacked in order while later ones
    still arrive."""
    posted, off = [], 0
    staged_in = sum(p.numel for p in recvs if not _direct_recv(p, dst, wire_in))
    stage_in = _staging(plan, "recv", staged_in, wire_in, dst.device) if staged_in else None
    for p, tag in zip(recvs, _tags(recvs)):
        if _direct_recv(p, dst, wire_in):
            buf, direct = dst.buffer.narrow(0, int(p.dst_offsets[0]), p.numel), True
        else:
            buf, direct = stage_in.narrow(0, off, p.numel), False
            off += p.numel
        posted.append((dist.irecv(buf, p.src, group=group, tag=tag), p, buf, direct))
        stats.recv_bytes += buf.numel() * buf.element_size()
    width = max((p.numel for p in sends), default=0)
    ring = _staging(plan, "send", SEND_SLOTS * width, wire_out, src.device) if sends else None
    slots: list = [None] * SEND_SLOTS
    sent = []
    for i, (p, tag) in enumerate(zip(sends, _tags(sends))):
        if p.lengths.numel() == 1 and wire_out == src.dtype:  # one interval: send it in place
            buf = src.buffer.narrow(0, int(p.src_offsets[0]), p.numel)
            sent.append(dist.isend(buf, p.dst, group=group, tag=tag))
        else:
            k = i % SEND_SLOTS
            if slots[k] is not None:
                slots[k].wait()  # the slot's previous piece has left (wait once: gloo)
            buf = ring.narrow(0, k * width, p.numel)
            _pack_into(buf, src.buffer, p)
            slots[k] = dist.isend(buf, p.dst, group=group, tag=tag)
        stats.sent_bytes += buf.numel() * buf.element_size()
    sent += [w for w in slots if w is not None]
    _local_copies(local, src, dst, stats, wire_out)
    for work, p, buf, direct in posted:
        work.wait()
        if not direct:
            ops.scatter_intervals(dst.buffer, p.dst_offsets, p.lengths, buf.to(dst.dtype))
    for work in sent:
        work.wait()


def _direct_recv(p: Transfer, dst: FlatParams, wire: torch.dtype) -> bool:
    return p.lengths.numel() == 1 and wire == dst.dtype


def _pack_into(out: torch.Tensor, src: torch.Tensor, p: Transfer) -> None:
    if out.dtype == src.dtype:
        ops.copy_intervals(
            out, torch.cumsum(p.lengths, 0) - p.lengths, src, p.src_offsets, p.lengths
        )
    else:
        out.copy_(ops.gather_intervals(src, p.src_offsets, p.lengths))


def _exchange_batched(plan, sends, recvs, local, src, dst, wire_out, wire_in, group, stats) -> None:
    """NCCL (and others): every message in one batch_isend_irecv group, as NCCL needs."""
    p2p, unpack = [], []
    for p in sends:
        buf = _pack(src.buffer, p.src_offsets, p.lengths, wire_out)
        p2p.append(dist.P2POp(dist.isend, buf, p.dst, group=group))
        stats.sent_bytes += buf.numel() * buf.element_size()
    for p in recvs:
        buf, direct = _recv_buffer(dst, p, wire_in)
        p2p.append(dist.P2POp(dist.irecv, buf, p.src, group=group))
        stats.recv_bytes += buf.numel() * buf.element_size()
        if not direct:
            unpack.append((p, buf))
    works = dist.batch_isend_irecv(p2p) if p2p else []
    _local_copies(local, src, dst, stats, wire_out)
    for work in works:
        work.wait()
    for p, buf in unpack:
        ops.scatter_intervals(dst.buffer, p.dst_offsets, p.lengths, buf.to(dst.dtype))


def _local_copies(local: list[Transfer], src, dst, stats: ReallocStats, wire) -> None:
    for t in local:
        _copy_local(src, dst, t, wire)
        stats.local_bytes += t.numel * dst.buffer.element_size()


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
