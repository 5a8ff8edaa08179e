"""What the master decides from metadata alone for an MFC on a mesh: the dp split, the moves of
inputs between workers, and the merged stats."""

from __future__ import annotations

import itertools
import random

import torch

from realflow.api.data import SequenceSample
from realflow.parallel.layout import Mesh
from realflow.system.mesh_dispatch import dp_parts, merge_stats, plan_moves


def meta(ids: list[int], lengths: list[int], key: str = "ids") -> SequenceSample:
    seqs = {key: [torch.zeros(n, dtype=torch.long) for n in lengths]}
    return SequenceSample.from_sequences(ids, seqs).meta()


def brute_force_best(lengths: list[int], k: int) -> int:
    """The smallest possible largest part over every cut of `lengths` into k contiguous parts."""
    n, best = len(lengths), None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        worst = max(sum(lengths[a:b]) for a, b in itertools.pairwise(bounds))
        best = worst if best is None else min(best, worst)
    return best


def test_dp_parts_cover_the_batch_in_order_with_the_least_possible_largest_part():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(2, 9)
        lengths = [rng.randint(1, 50) for _ in range(n)]
        ids = [f"s{i}" for i in range(n)]
        for dp in range(1, min(n, 4) + 1):
            parts = dp_parts(meta(ids, lengths), dp)
            assert len(parts) == dp and all(parts)
            assert [i for p in parts for i in p] == ids  # contiguous, in order, each once
            tokens = {i: n for i, n in zip(ids, lengths, strict=True)}
            largest = max(sum(tokens[i] for i in p) for p in parts)
            assert largest == brute_force_best(lengths, dp), (lengths, dp, parts)


def test_moves_bring_each_worker_its_dp_ranks_samples_once_in_one_global_order():
    ids = list(range(6))
    metas = {"a": meta(ids, [3, 1, 4, 1, 5, 9], "a"), "b": meta(ids, [2, 7, 1, 8, 2, 8], "b")}
    # `a` was made by a dp=2 MFC on workers 0 and 1 (3 samples each); `b` on worker 2 alone.
    held = {"a": {0: {0, 1, 2}, 1: {3, 4, 5}}, "b": {2: set(ids)}}
    mesh = Mesh.parse("d2t1p1@1,3")  # dp rank 0 on worker 1, dp rank 1 on worker 3
    parts = [[0, 1, 2, 3], [4, 5]]
    moves = plan_moves(mesh, parts, ["a", "b"], held, metas)
    assert [(s, d) for s, d, _ in moves] == sorted((s, d) for s, d, _ in moves)
    got: dict[int, dict[str, list[int]]] = {1: {}, 3: {}}
    for src, dst, t in moves:
        assert t.src == src
        for key in t.meta.keys:
            assert set(t.meta.ids) <= held[key][src]  # sent by a worker that holds them
            got[dst].setdefault(key, []).extend(t.meta.ids)
            # the transfer's lengths are the samples' own
            rows = [metas[key].ids.index(i) for i in t.meta.ids]
            assert t.meta.seqlens[key] == [metas[key].seqlens[key][r] for r in rows]
    # worker 1 already holds a of 3; it lacks a of 0,1,2 (on worker 0) and b of its four samples
    assert sorted(got[1]["a"]) == [0, 1, 2] and sorted(got[1]["b"]) == [0, 1, 2, 3]
    assert sorted(got[3]["a"]) == [4, 5] and sorted(got[3]["b"]) == [4, 5]
    # keys sent by one worker for the same samples travel together
    (from2to3,) = [t for s, d, t in moves if (s, d) == (2, 3)]
    assert from2to3.meta.keys == {"b"}


def test_moves_take_each_sample_from_its_lowest_numbered_holder():
    """Samples held by several workers (random overlaps): every worker gets each sample it
    lacks once, from the lowest-numbered worker holding it, in one transfer per (source,
    destination, samples) with every key that source sends of them; checked against a plain
    loop over the workers, keys and holders."""
    rng = random.Random(0)
    ids = list(range(12))
    for _ in range(30):
        metas = {k: meta(ids, [rng.randint(1, 5) for _ in ids], k) for k in ("a", "b")}
        held = {k: {w: set(rng.sample(ids, 6)) for w in rng.sample(range(8), 4)} for k in metas}
        for k in held:  # every sample held somewhere
            held[k][min(held[k])] |= set(ids) - set().union(*held[k].values())
        mesh = Mesh.parse("d2t2p1@2-5")
        parts = [ids[:7], ids[7:]]
        expected: dict[tuple[int, int], dict[tuple[int, ...], list[str]]] = {}
        for w in mesh.workers:
            for key in ("a", "b"):
                lacking = [i for i in parts[mesh.coords(w).dp] if i not in held[key].get(w, ())]
                for src in sorted(held[key]):
                    take = [i for i in lacking if i in held[key][src]]
                    if take:
                        expected.setdefault((src, w), {}).setdefault(tuple(take), []).append(key)
                    lacking = [i for i in lacking if i not in held[key][src]]
        got: dict[tuple[int, int], dict[tuple[int, ...], list[str]]] = {}
        for src, dst, t in plan_moves(mesh, parts, ["a", "b"], held, metas):
            got.setdefault((src, dst), {})[tuple(t.meta.ids)] = sorted(t.meta.keys)
        assert got == expected


def test_tp_peers_of_a_dp_rank_get_the_same_samples():
    ids = list(range(4))
    metas = {"a": meta(ids, [1, 2, 3, 4], "a")}
    held = {"a": {4: set(ids)}}
    mesh = Mesh.parse("d2t2p1@0-3")  # dp rank 0: workers 0, 1; dp rank 1: workers 2, 3
    moves = plan_moves(mesh, [[0, 1, 2], [3]], ["a"], held, metas)
    sent = {d: list(t.meta.ids) for _, d, t in moves}
    assert sent == {0: [0, 1, 2], 1: [0, 1, 2], 2: [3], 3: [3]}


def test_merged_stats_weigh_each_dp_rank_by_its_samples():
    merged = merge_stats([{"loss": 1.0, "lr": 0.1}, {"loss": 4.0, "lr": 0.1, "x": 2.0}], [3, 1])
    assert merged == {"loss": (3 * 1.0 + 4.0) / 4, "lr": 0.1, "x": 2.0}


def test_merged_stats_sum_the_ranks_token_counts():
    merged = merge_stats([{"nll": 2.0, "n_tokens": 3.0}, {"nll": 2.0, "n_tokens": 5.0}], [1, 2])
    assert merged == {"nll": 2.0, "n_tokens": 8.0}
