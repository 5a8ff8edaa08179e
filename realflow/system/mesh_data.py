"""How the master moves data for an MFC that runs on a mesh of workers (metadata only).

- `dp_parts`: the batch split over the mesh's data-parallel ranks, balanced by token count;
  every tp / pp peer of a dp rank gets the same part.
- `plan_moves`: which worker sends which samples of which keys to which worker, in one global
  order that every worker follows (so two workers never wait on each other's send).
- `merge_stats`: the stats of the dp ranks as one row.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from realflow.api.data import SequenceSample
from realflow.parallel.layout import Mesh
from realflow.system.worker import Transfer


def dp_parts(meta: SequenceSample, dp: int) -> list[list[Any]]:
    """The sample ids of each dp rank: `meta` cut into `dp` contiguous parts whose largest
    token count (over all keys of `meta`) is as small as possible."""
    return [list(part.ids) for part in meta.split(dp)]


def subset(meta: SequenceSample, ids: Sequence[Any]) -> SequenceSample:
    """The metadata of samples `ids` (in that order) of `meta`."""
    row = {i: r for r, i in enumerate(meta.ids)}
    return meta.index([row[i] for i in ids])


def plan_moves(
    mesh: Mesh,
    parts: list[list[Any]],
    keys: Sequence[str],
    held: dict[str, dict[int, set[Any]]],
    metas: dict[str, SequenceSample],
) -> list[tuple[int, int, Transfer]]:
    """(src, dst, transfer) for every piece of input an MFC's workers lack, sorted by (src,
    dst): each worker of `mesh` needs keys `keys` of its dp rank's samples; `held[key][w]` are
    the samples worker w holds of `key`. A sample comes from the lowest-numbered holder. One
    transfer per (src, dst, samples), carrying all the keys of those samples it sends."""
    pieces: dict[tuple[int, int], dict[tuple[Any, ...], list[str]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for w in mesh.workers:
        ids = parts[mesh.coords(w).dp]
        for key in dict.fromkeys(keys):
            have = held[key]
            missing = [i for i in ids if i not in have.get(w, ())]
            for src in sorted(have):
                if not missing:
                    break
                take = [i for i in missing if i in have[src]]
                if take and src != w:
                    pieces[(src, w)][tuple(take)].append(key)
                    missing = [i for i in missing if i not in have[src]]
            assert not missing, f"no worker holds samples {missing[:3]} of key {key!r}"
    moves = []
    for (src, dst), by_ids in sorted(pieces.items()):
        for ids, ks in by_ids.items():
            meta = subset(metas[ks[0]], ids).meta()
            for k in ks[1:]:
                meta.update_(subset(metas[k], ids).meta())
            moves.append((src, dst, Transfer(src, meta)))
    return moves


def merge_stats(stats: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """Per-key mean of the dp ranks' stats, weighted by `weights` (their sample counts) over
    the ranks that report the key. Values every rank shares (grad_norm, lr) stay as they are."""
    sums: dict[str, float] = collections.defaultdict(float)
    totals: dict[str, float] = collections.defaultdict(float)
    for s, w in zip(stats, weights, strict=True):
        for k, v in s.items():
            sums[k] += float(v) * w
            totals[k] += w
    return {k: sums[k] / totals[k] if totals[k] else 0.0 for k in sums}
