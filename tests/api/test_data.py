"""SequenceSample: packing, validation, keys, and the splits, checked against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realflow.api.data import (
    SequenceSample,
    SequenceSampleError,
    _dp_partition,
    balanced_partition,
    cu_seqlens_from_lengths,
    lengths_from_cu_seqlens,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Three kinds of key: int64 ids, float32 per-token values, a bool key with a trailing dim of 2.
KEY_KINDS = {
    "packed_input_ids": (torch.int64, ()),
    "logprobs": (torch.float32, ()),
    "flags": (torch.bool, (2,)),
}


def seq(key: str, n: int, tag: int) -> torch.Tensor:
    """A recognisable sequence: values encode the sample and position, so a mixed-up order shows."""
    dtype, trailing = KEY_KINDS[key]
    values = torch.arange(n) + 1000 * tag
    if trailing:
        return torch.stack([values % 2 == 0, values % 3 == 0], dim=1)
    return values.to(dtype)


def make(lengths: dict[str, list[list[int]]], ids=None, metadata=None) -> SequenceSample:
    """A sample whose key `k` holds, for sample i, sequences of the lengths `lengths[k][i]`."""
    bs = len(next(iter(lengths.values())))
    ids = list(range(bs)) if ids is None else ids
    seqs = {
        k: [[seq(k, n, 10 * i + j) for j, n in enumerate(group)] for i, group in enumerate(lens)]
        for k, lens in lengths.items()
    }
    return SequenceSample.from_sequences(ids, seqs, metadata)


def assert_same(a: SequenceSample, b: SequenceSample) -> None:
    assert a.ids == b.ids
    assert a.seqlens == b.seqlens
    assert a.metadata == b.metadata
    assert a.trailing_shapes == b.trailing_shapes
    assert a.dtypes == b.dtypes
    assert (a.data is None) == (b.data is None)
    if a.data is not None:
        assert a.data.keys() == b.data.keys()
        for k in a.data:
            assert a.data[k].dtype == b.data[k].dtype
            assert torch.equal(a.data[k], b.data[k]), k


@st.composite
def sequence_samples(draw, max_bs: int = 8, max_len: int = 6) -> SequenceSample:
    bs = draw(st.integers(1, max_bs))
    keys = draw(st.lists(st.sampled_from(list(KEY_KINDS)), min_size=1, max_size=3, unique=True))
    lengths = {
        k: [
            draw(st.lists(st.integers(0, max_len), min_size=1, max_size=3))  # a group per sample
            for _ in range(bs)
        ]
        for k in keys
    }
    ids = draw(st.lists(st.integers(0, 10**6) | st.text(max_size=4), min_size=bs, max_size=bs,
                        unique=True))  # fmt: skip
    metadata = {"answer": [f"answer-{i}" for i in ids]} if draw(st.booleans()) else {}
    return make(lengths, ids=ids, metadata=metadata)


def brute_force_min_max(costs: list[int], k: int, min_size: int) -> int:
    """The smallest largest part over every way to cut `costs` into k contiguous parts."""
    n, best = len(costs), None
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = [0, *cuts, n]
        parts = [costs[a:b] for a, b in zip(edges, edges[1:])]
        if all(len(p) >= min_size for p in parts):
            worst = max(sum(p) for p in parts)
            best = worst if best is None else min(best, worst)
    assert best is not None
    return best


def brute_force_min_count(costs: list[int], budget: int) -> int:
    """The fewest contiguous parts within `budget` tokens (a lone oversize sample is allowed)."""
    n = len(costs)
    best = n
    for r in range(n):
        for cuts in itertools.combinations(range(1, n), r):
            edges = [0, *cuts, n]
            parts = [costs[a:b] for a, b in zip(edges, edges[1:])]
            if all(sum(p) <= budget or len(p) == 1 for p in parts):
                best = min(best, len(parts))
    return best


# ---- construction and views ------------------------------------------------------------------


def test_from_sequences_packs_in_order():
    s = SequenceSample.from_sequences(
        ["a", "b"],
        {
            "packed_input_ids": [
                torch.tensor([1, 2, 3]),
                [torch.tensor([4]), torch.tensor([5, 6])],
            ],
            "values": [torch.zeros(3, 4), [torch.ones(1, 4), torch.ones(2, 4)]],
        },
        metadata={"answer": ["x", "y"]},
    )
    assert s.bs == len(s) == 2
    assert s.keys == {"packed_input_ids", "values"}
    assert s.seqlens["packed_input_ids"] == [[3], [1, 2]]
    assert torch.equal(s.data["packed_input_ids"], torch.tensor([1, 2, 3, 4, 5, 6]))
    assert s.trailing_shapes == {"packed_input_ids": (), "values": (4,)}
    assert s.dtypes == {"packed_input_ids": torch.int64, "values": torch.float32}
    assert s.total_tokens("packed_input_ids") == 6
    assert s.flat_seqlens("packed_input_ids") == [3, 1, 2]
    assert s.sample_tokens() == [3, 3]
    assert "bs=2" in repr(s)


def test_sample_tokens_is_the_largest_key_per_sample():
    s = make({"packed_input_ids": [[2], [5, 1]], "logprobs": [[7], [1]]})
    assert s.sample_tokens() == [7, 6]
    assert SequenceSample(ids=[1, 2], seqlens={}).sample_tokens() == [1, 1]


def test_cu_seqlens_helpers():
    s = make({"packed_input_ids": [[3], [1, 2], [0]]})
    cu = s.cu_seqlens("packed_input_ids")
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 4, 6, 6]
    assert lengths_from_cu_seqlens(cu) == [3, 1, 2, 0]
    assert cu_seqlens_from_lengths([]).tolist() == [0]
    assert cu_seqlens_from_lengths(torch.tensor([2, 5])).tolist() == [0, 2, 7]


def test_meta_has_no_tensors_and_is_a_copy():
    s = make({"packed_input_ids": [[3], [2]], "flags": [[1], [2]]}, metadata={"m": [1, 2]})
    m = s.meta()
    assert m.data is None
    assert m.ids == s.ids and m.seqlens == s.seqlens and m.metadata == s.metadata
    assert m.trailing_shapes == {"packed_input_ids": (), "flags": (2,)}
    assert m.dtypes == {"packed_input_ids": torch.int64, "flags": torch.bool}
    m.seqlens["packed_input_ids"][0][0] = 99
    m.metadata["m"][0] = 99
    assert s.seqlens["packed_input_ids"][0] == [3] and s.metadata["m"] == [1, 2]
    assert m.meta().seqlens == m.seqlens  # a meta of a meta is fine


# ---- validation ------------------------------------------------------------------------------


def test_validation_errors_are_clear():
    t = torch.arange(5)
    with pytest.raises(SequenceSampleError, match=r"ids must be unique, got \[1, 1\]"):
        SequenceSample(ids=[1, 1], seqlens={"x": [[1], [1]]})
    with pytest.raises(SequenceSampleError, match="key 'x' has lengths for 1 samples, but there"):
        SequenceSample(ids=[1, 2], seqlens={"x": [[1]]})
    with pytest.raises(SequenceSampleError, match=r"key 'x' sample 2: lengths must be ints >= 0"):
        SequenceSample(ids=[1, 2], seqlens={"x": [[1], [-1]]})
    with pytest.raises(SequenceSampleError, match=r"key 'x' sample 1: lengths must be ints"):
        SequenceSample(ids=[1], seqlens={"x": [[1.5]]})
    with pytest.raises(SequenceSampleError, match="metadata 'm' has 1 entries, but there are 2"):
        SequenceSample(ids=[1, 2], seqlens={}, metadata={"m": [0]})
    with pytest.raises(SequenceSampleError, match="key 'x': packed tensor has 5 rows, lengths sum"):
        SequenceSample(ids=[1], seqlens={"x": [[4]]}, data={"x": t})
    with pytest.raises(SequenceSampleError, match=r"data keys \['y'\] differ from seqlens keys"):
        SequenceSample(ids=[1], seqlens={"x": [[5]]}, data={"y": t})
    with pytest.raises(SequenceSampleError, match="key 'x' has 1 samples but there are 2 ids"):
        SequenceSample.from_sequences([1, 2], {"x": [t]})


def test_declared_shapes_and_dtypes_must_match_the_tensors():
    # The master allocates from meta(): a wrong declaration used to pass unnoticed.
    t = torch.arange(5)
    with pytest.raises(SequenceSampleError, match=r"key 'x': trailing shape is declared \(2,\)"):
        SequenceSample(ids=[1], seqlens={"x": [[5]]}, data={"x": t}, trailing_shapes={"x": (2,)})
    with pytest.raises(SequenceSampleError, match="key 'x': dtype is declared torch.float32"):
        SequenceSample(ids=[1], seqlens={"x": [[5]]}, data={"x": t}, dtypes={"x": torch.float32})
    a = make({"logprobs": [[2]]}, ids=[0])
    b = SequenceSample(
        ids=[1], seqlens={"logprobs": [[2]]}, data={"logprobs": torch.ones(2).long()}
    )
    with pytest.raises(SequenceSampleError, match="cannot gather key 'logprobs': the samples disa"):
        SequenceSample.gather([a, b])  # torch.cat would have promoted to float32 silently
    c = SequenceSample(ids=[2], seqlens={"logprobs": [[1]]}, data={"logprobs": torch.ones(1, 3)})
    with pytest.raises(SequenceSampleError, match="cannot gather key 'logprobs'"):
        SequenceSample.gather([a, c])


# ---- keys ------------------------------------------------------------------------------------


def test_select_and_remap_keys():
    s = make({"packed_input_ids": [[3], [2]], "logprobs": [[2], [1]]}, metadata={"m": [1, 2]})
    sel = s.select(["logprobs"])
    assert sel.keys == {"logprobs"} and sel.metadata == {"m": [1, 2]}
    assert sel.data["logprobs"] is s.data["logprobs"]  # shared, not copied
    with pytest.raises(SequenceSampleError, match=r"keys \['nope'\] not in sample"):
        s.select(["nope"])

    r = s.remap_keys({"logprobs": "ref_logprobs"})
    assert r.keys == {"packed_input_ids", "ref_logprobs"}
    assert torch.equal(r.data["ref_logprobs"], s.data["logprobs"])
    assert r.dtypes["ref_logprobs"] == torch.float32
    assert_same(r.remap_keys({"ref_logprobs": "logprobs"}), s)
    with pytest.raises(SequenceSampleError, match="makes two keys share a name"):
        s.remap_keys({"logprobs": "packed_input_ids"})


def test_update_merges_another_samples_keys():
    s = make({"packed_input_ids": [[3], [2]], "logprobs": [[2], [1]]}, metadata={"m": [1, 2]})
    a = s.select(["packed_input_ids"])
    a.metadata = {}
    a.update_(s.select(["logprobs"]))
    assert_same(a, s)
    with pytest.raises(SequenceSampleError, match="different ids"):
        a.update_(s.index([1, 0]))
    with pytest.raises(SequenceSampleError, match="with tensors and one without"):
        a.update_(s.meta())


# ---- index, gather, split --------------------------------------------------------------------


def test_index_reorders_and_gather_concatenates():
    s = make(
        {"packed_input_ids": [[3], [1, 2], [4]]}, ids=["a", "b", "c"], metadata={"m": [1, 2, 3]}
    )
    r = s.index([2, 0])
    assert r.ids == ["c", "a"] and r.seqlens["packed_input_ids"] == [[4], [3]]
    assert r.metadata == {"m": [3, 1]}
    assert torch.equal(r.data["packed_input_ids"], torch.cat([seq("packed_input_ids", 4, 20),
                                                              seq("packed_input_ids", 3, 0)]))  # fmt: skip
    assert_same(SequenceSample.gather([s.index([0]), s.index([1, 2])]), s)
    assert_same(SequenceSample.gather(s.unpack()), s)
    with pytest.raises(SequenceSampleError, match="ids must be unique"):
        s.index([0, 0])


def test_gather_errors_and_key_subset():
    s = make({"packed_input_ids": [[3], [2]], "logprobs": [[2], [1]]})
    a, b = s.unpack()
    g = SequenceSample.gather([a, b], keys=["logprobs"])
    assert g.keys == {"logprobs"}
    with pytest.raises(SequenceSampleError, match="empty list"):
        SequenceSample.gather([])
    with pytest.raises(SequenceSampleError, match=r"lacks keys \['packed_input_ids'\]"):
        SequenceSample.gather([a, b.select(["logprobs"])])
    with pytest.raises(SequenceSampleError, match="with tensors and samples without"):
        SequenceSample.gather([a, b.meta()])
    with pytest.raises(SequenceSampleError, match="ids must be unique"):
        SequenceSample.gather([a, a])
    assert SequenceSample.gather([a.meta(), b.meta()]).seqlens == s.seqlens


def test_split_examples():
    s = make({"packed_input_ids": [[5], [1], [1], [1], [1], [5]]})
    parts = s.split(2)
    assert [p.ids for p in parts] == [[0, 1, 2], [3, 4, 5]]
    parts = s.split(3, min_size=2)
    assert [p.ids for p in parts] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(
        SequenceSampleError, match="cannot split 6 samples into 4 parts of at least 2"
    ):
        s.split(4, min_size=2)
    with pytest.raises(SequenceSampleError, match="must be positive"):
        s.split(0)


def test_split_by_token_budget_examples():
    s = make({"packed_input_ids": [[2], [2], [9], [1], [1], [3]]})
    assert [p.ids for p in s.split_by_token_budget(4)] == [[0, 1], [2], [3, 4], [5]]
    assert [p.ids for p in s.split_by_token_budget(100)] == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(SequenceSampleError, match=r"max_tokens \(0\) must be positive"):
        s.split_by_token_budget(0)


def test_balanced_partition_examples_and_errors():
    assert balanced_partition([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balanced_partition([10, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert balanced_partition([3], 1) == [(0, 1)]
    assert balanced_partition([0, 0, 0], 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(SequenceSampleError, match="cannot split 2 samples into 3 parts"):
        balanced_partition([1, 1], 3)
    with pytest.raises(SequenceSampleError, match="must be positive"):
        balanced_partition([1, 1], 1, min_size=0)


def test_balanced_partition_of_equal_costs_is_the_dynamic_programs():
    """Equal costs take a closed form (O(k), for the simulator's 1024-way splits): the same
    cuts as the exact DP, ties included (zero costs: every cut ties), for every small case."""
    for n in range(1, 26):
        for k in range(1, n + 1):
            for min_size in range(1, n // k + 1):
                for c in (0, 1, 3):
                    costs = [c] * n
                    expected = _dp_partition(costs, k, min_size)
                    assert balanced_partition(costs, k, min_size) == expected, (n, k, min_size, c)


# ---- properties ------------------------------------------------------------------------------


@PROPERTY
@given(s=sequence_samples(), data=st.data())
def test_split_then_gather_is_the_identity(s, data):
    k = data.draw(st.integers(1, s.bs))
    min_size = data.draw(st.integers(1, s.bs // k))
    parts = s.split(k, min_size=min_size)
    assert len(parts) == k and all(p.bs >= min_size for p in parts)
    assert_same(SequenceSample.gather(parts), s)
    # The master splits the tensor-less view the same way.
    assert [p.ids for p in s.meta().split(k, min_size=min_size)] == [p.ids for p in parts]


@PROPERTY
@given(s=sequence_samples(), data=st.data())
def test_split_balance_matches_brute_force(s, data):
    k = data.draw(st.integers(1, s.bs))
    min_size = data.draw(st.integers(1, s.bs // k))
    costs = s.sample_tokens()
    largest = max(sum(p.sample_tokens()) for p in s.split(k, min_size=min_size))
    assert largest == brute_force_min_max(costs, k, min_size)


@PROPERTY
@given(costs=st.lists(st.integers(0, 20), min_size=1, max_size=9), data=st.data())
def test_balanced_partition_is_exact(costs, data):
    n = len(costs)
    k = data.draw(st.integers(1, n))
    min_size = data.draw(st.integers(1, n // k))
    bounds = balanced_partition(costs, k, min_size)
    assert len(bounds) == k
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(end == start for (_, end), (start, _) in zip(bounds, bounds[1:]))
    assert all(b - a >= min_size for a, b in bounds)
    assert max(sum(costs[a:b]) for a, b in bounds) == brute_force_min_max(costs, k, min_size)


@PROPERTY
@given(s=sequence_samples(max_len=8), budget=st.integers(1, 30))
def test_token_budget_split_is_within_budget_minimal_and_lossless(s, budget):
    parts = s.split_by_token_budget(budget)
    assert_same(SequenceSample.gather(parts), s)
    for p in parts:
        assert sum(p.sample_tokens()) <= budget or p.bs == 1
    assert len(parts) == brute_force_min_count(s.sample_tokens(), budget)


@PROPERTY
@given(s=sequence_samples())
def test_unpack_gather_and_key_round_trips(s):
    assert_same(SequenceSample.gather(s.unpack()), s)
    keys = sorted(s.keys)
    first = s.select(keys[:1])
    first.update_(s.select(keys[1:]))
    assert_same(first, s)
    mapping = {k: f"renamed_{k}" for k in keys}
    assert_same(s.remap_keys(mapping).remap_keys({v: k for k, v in mapping.items()}), s)
    m = s.meta()
    assert m.data is None and m.seqlens == s.seqlens and m.dtypes == s.dtypes
