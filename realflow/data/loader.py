"""An epoch-based, resumable loader that gathers dataset samples into SequenceSample batches.

Batch ids are unique over a whole run: the sample of row r in epoch e gets the id
`e * len(dataset) + r`; metadata `row` keeps r and `epoch` keeps e. The order of epoch e is a
permutation drawn from (seed, e) alone, so `state_dict()` (epoch, position, seed) is all a resumed
run needs to produce exactly the batches an uninterrupted run would have produced.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator
from typing import Any, Protocol

from realflow.api.data import SequenceSample

logger = logging.getLogger(__name__)


class MapDataset(Protocol):
    """What the loader needs: `len` and one-sample SequenceSamples by row index."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> SequenceSample: ...


class DataLoader:
    """Batches of `batch_size` samples, epoch after epoch.

    `next_batch()` never ends: it moves to the next epoch (with a new order when shuffling) when
    the current one runs out. `iter(loader)` yields the rest of the current epoch and stops, which
    suits evaluation (`shuffle=False, drop_last=False`). With drop_last=True the tail of an epoch
    that cannot fill a batch is skipped; otherwise it comes as a smaller last batch.
    """

    def __init__(
        self,
        dataset: MapDataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ):
        n = len(dataset)
        if batch_size <= 0:
            raise ValueError(f"batch_size ({batch_size}) must be positive")
        if drop_last and batch_size > n:
            raise ValueError(
                f"batch_size ({batch_size}) is larger than the dataset ({n} rows) and "
                "drop_last=True would never yield a batch"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # index into the epoch's order of the next sample
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """The row order of `epoch`: a permutation of range(len(dataset)) from (seed, epoch)."""
        rows = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(f"realflow-loader:{self.seed}:{epoch}").shuffle(rows)
        return rows

    def _current_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        return self._order

    def _epoch_exhausted(self) -> bool:
        left = len(self.dataset) - self.position
        return left <= 0 or (self.drop_last and left < self.batch_size)

    def next_batch(self) -> SequenceSample:
        """The next batch, starting a new epoch first when the current one is exhausted."""
        if self._epoch_exhausted():
            self._start_next_epoch()
        order = self._current_order()
        rows = order[self.position : self.position + self.batch_size]
        self.position += len(rows)
        return SequenceSample.gather([self._sample(r, self.epoch) for r in rows])

    def __iter__(self) -> Iterator[SequenceSample]:
        """The remaining batches of the current epoch; the next `next_batch` or `iter` call
        starts the following epoch."""
        if self._epoch_exhausted():
            self._start_next_epoch()
        while not self._epoch_exhausted():
            yield self.next_batch()

    def epoch_batches(self, epoch: int = 0) -> Iterator[SequenceSample]:
        """Every batch of `epoch` in order, leaving the loader's own position alone: the same
        batches each time (evaluation)."""
        order = self.epoch_order(epoch)
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        for i in range(0, stop, self.batch_size):
            rows = order[i : i + self.batch_size]
            yield SequenceSample.gather([self._sample(r, epoch) for r in rows])

    def _start_next_epoch(self) -> None:
        self.epoch += 1
        self.position = 0

    def _sample(self, row: int, epoch: int) -> SequenceSample:
        """The dataset's sample of `row` with a run-unique id (the dataset's object is not changed)."""
        s = self.dataset[row]
        if s.bs != 1:
            raise ValueError(f"dataset[{row}] holds {s.bs} samples; the loader needs exactly 1")
        metadata = {**s.metadata, "row": [row], "epoch": [epoch]}
        return dataclasses.replace(s, ids=[epoch * len(self.dataset) + row], metadata=metadata)

    # ---- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: epoch, position, seed (+ sizes, checked on load)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "dataset_len": len(self.dataset),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off. The dataset length must match (another dataset would
        give other batches); a changed batch size or shuffle setting is applied with a warning."""
        if state["dataset_len"] != len(self.dataset):
            raise ValueError(
                f"loader state is for a dataset of {state['dataset_len']} rows, "
                f"this dataset has {len(self.dataset)}"
            )
        for key in ("batch_size", "shuffle", "drop_last"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                logger.warning(
                    "resuming a loader with %s=%s (saved with %s): batches will differ from the "
                    "original run",
                    key,
                    getattr(self, key),
                    state[key],
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self._order_epoch = None
