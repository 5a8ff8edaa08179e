from __future__ import annotations

import pytest
import torch

from realflow.data.datasets import PromptAnswerDataset, PromptDataset
from realflow.data.loader import DataLoader


@pytest.fixture(scope="module")
def ds(tok):
    return PromptDataset("builtin:mix", tok, n_rows=10)


def _same(a, b) -> bool:
    return (
        a.ids == b.ids
        and a.seqlens == b.seqlens
        and a.metadata == b.metadata
        and all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    )


def test_batches_cover_each_epoch_with_unique_ids(ds):
    loader = DataLoader(ds, batch_size=3, seed=0)
    assert len(loader) == 3
    batches = [loader.next_batch() for _ in range(9)]  # 3 epochs
    assert all(b.bs == 3 for b in batches)
    ids = [i for b in batches for i in b.ids]
    assert len(set(ids)) == len(ids)
    for epoch in range(3):
        epoch_batches = batches[3 * epoch : 3 * epoch + 3]
        rows = [r for b in epoch_batches for r in b.metadata["row"]]
        assert len(set(rows)) == 9  # drop_last: one row of 10 left out
        assert all(e == epoch for b in epoch_batches for e in b.metadata["epoch"])
        assert all(
            i == epoch * len(ds) + r
            for b in epoch_batches
            for i, r in zip(b.ids, b.metadata["row"])
        )
        assert rows == loader.epoch_order(epoch)[:9]
    assert loader.epoch_order(0) != loader.epoch_order(1)
    row = batches[0].metadata["row"][0]
    assert torch.equal(batches[0].index([0]).data["packed_prompts"], ds[row].data["packed_prompts"])


def test_resume_gives_identical_batches(ds):
    reference = DataLoader(ds, batch_size=4, seed=5)
    expected = [reference.next_batch() for _ in range(12)]
    first = DataLoader(ds, batch_size=4, seed=5)
    got = [first.next_batch() for _ in range(5)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["position"] == 4
    resumed = DataLoader(ds, batch_size=4, seed=123)  # seed comes from the state
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(7)]
    assert all(_same(a, b) for a, b in zip(got, expected))


def test_iter_is_one_epoch_and_no_shuffle_keeps_order(ds):
    loader = DataLoader(ds, batch_size=4, shuffle=False, drop_last=False)
    batches = list(loader)
    assert [b.bs for b in batches] == [4, 4, 2]
    assert [r for b in batches for r in b.metadata["row"]] == list(range(10))
    second = list(loader)
    assert [i for b in second for i in b.ids] == list(range(10, 20))


def test_errors(ds, tok):
    with pytest.raises(ValueError, match="larger than the dataset"):
        DataLoader(ds, batch_size=11)
    loader = DataLoader(ds, batch_size=2)
    other = DataLoader(PromptAnswerDataset("builtin:add", tok, n_rows=4), batch_size=2)
    with pytest.raises(ValueError, match="dataset of 10 rows"):
        other.load_state_dict(loader.state_dict())
