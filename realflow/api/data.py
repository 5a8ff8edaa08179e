"""SequenceSample: the one batch type that crosses every boundary in realflow.

A SequenceSample holds B samples. Each sample has an id and, for each key, a list of sequence
lengths: one sample may hold several sequences under one key (a group of answers in GRPO, a
chosen/rejected pair in DPO). Tensors are packed: for key `k`, `data[k]` has shape
`(sum of all lengths of k, *trailing_shapes[k])`, samples in order, no padding.

Keys used by the built-in algorithms (T = tokens of the key, `L_i` the length of sequence i):

| key | per sequence | dtype | meaning |
| --- | --- | --- | --- |
| packed_prompts | L_i | int64 | prompt token ids |
| packed_input_ids | L_i | int64 | prompt + answer token ids |
| prompt_mask | L_i | bool | 1 on prompt tokens of packed_input_ids |
| logprobs, ref_logprobs | L_i - 1 | float32 | log p(token t+1 given tokens <= t) |
| values | L_i | float32 | critic value at each token |
| rewards | 1 | float32 | one task score per sequence |
| no_eos_mask | 1 | bool | 1 when generation stopped without EOS |

A view without tensors (`meta()`) is what the master holds: ids, lengths, keys, shapes, dtypes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch


class SequenceSampleError(ValueError):
    """A SequenceSample that breaks its own invariants, or an impossible split."""


@dataclasses.dataclass
class SequenceSample:
    """A packed batch of samples; see the module docstring for the layout."""

    ids: list[Hashable]
    seqlens: dict[str, list[list[int]]]
    data: dict[str, torch.Tensor] | None = None
    trailing_shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = dataclasses.field(default_factory=dict)
    metadata: dict[str, list[Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = list(self.ids)
        if self.data is not None:
            for k, t in self.data.items():
                self.trailing_shapes.setdefault(k, tuple(t.shape[1:]))
                self.dtypes.setdefault(k, t.dtype)
        self.validate()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_sequences(
        cls,
        ids: Sequence[Hashable],
        sequences: dict[str, Sequence[torch.Tensor | Sequence[torch.Tensor]]],
        metadata: dict[str, list[Any]] | None = None,
    ) -> SequenceSample:
        """Pack per-sample tensors. `sequences[key][i]` is one tensor (one sequence) or a list of
        tensors (several sequences) for sample i; dim 0 of each tensor is its length."""
        seqlens: dict[str, list[list[int]]] = {}
        data: dict[str, torch.Tensor] = {}
        for key, per_sample in sequences.items():
            if len(per_sample) != len(ids):
                raise SequenceSampleError(
                    f"key '{key}' has {len(per_sample)} samples but there are {len(ids)} ids"
                )
            lens, parts = [], []
            for item in per_sample:
                group = [item] if isinstance(item, torch.Tensor) else list(item)
                lens.append([int(t.shape[0]) for t in group])
                parts.extend(group)
            seqlens[key] = lens
            data[key] = torch.cat(parts) if parts else torch.empty(0)
        return cls(ids=list(ids), seqlens=seqlens, data=data, metadata=dict(metadata or {}))

    # ---- views ----------------------------------------------------------------------------------

    @property
    def keys(self) -> set[str]:
        return set(self.seqlens)

    @property
    def bs(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def total_tokens(self, key: str) -> int:
        return sum(sum(lens) for lens in self.seqlens[key])

    def sample_tokens(self) -> list[int]:
        """Per-sample cost used for balancing: the largest token count over the keys."""
        if not self.seqlens:
            return [1] * self.bs
        return [max(sum(self.seqlens[k][i]) for k in self.seqlens) for i in range(self.bs)]

    def flat_seqlens(self, key: str) -> list[int]:
        return [n for lens in self.seqlens[key] for n in lens]

    def cu_seqlens(self, key: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Cumulative sequence lengths of `key`, int32, shape (n_sequences + 1,)."""
        return cu_seqlens_from_lengths(self.flat_seqlens(key), device=device)

    def meta(self) -> SequenceSample:
        """The same sample without tensors: what the master holds."""
        return SequenceSample(
            ids=list(self.ids),
            seqlens={k: [list(v) for v in lens] for k, lens in self.seqlens.items()},
            data=None,
            trailing_shapes=dict(self.trailing_shapes),
            dtypes=dict(self.dtypes),
            metadata={k: list(v) for k, v in self.metadata.items()},
        )

    def validate(self) -> None:
        if len(set(self.ids)) != len(self.ids):
            raise SequenceSampleError(f"sample ids must be unique, got {self.ids}")
        for key, lens in self.seqlens.items():
            if len(lens) != self.bs:
                raise SequenceSampleError(
                    f"key '{key}' has lengths for {len(lens)} samples, but there are {self.bs} ids"
                )
            for i, group in enumerate(lens):
                if any((not isinstance(n, int)) or n < 0 for n in group):
                    raise SequenceSampleError(
                        f"key '{key}' sample {self.ids[i]!r}: lengths must be ints >= 0, got {group}"
                    )
        for key, values in self.metadata.items():
            if len(values) != self.bs:
                raise SequenceSampleError(
                    f"metadata '{key}' has {len(values)} entries, but there are {self.bs} ids"
                )
        if self.data is None:
            return
        if set(self.data) != set(self.seqlens):
            raise SequenceSampleError(
                f"data keys {sorted(self.data)} differ from seqlens keys {sorted(self.seqlens)}"
            )
        for key, t in self.data.items():
            expected = self.total_tokens(key)
            if t.shape[0] != expected:
                raise SequenceSampleError(
                    f"key '{key}': packed tensor has {t.shape[0]} rows, lengths sum to {expected}"
                )
            # meta() hands these to the master, which allocates by them: they must be the truth.
            shape, dtype = self.trailing_shapes.get(key), self.dtypes.get(key)
            if shape is not None and tuple(shape) != tuple(t.shape[1:]):
                raise SequenceSampleError(
                    f"key '{key}': trailing shape is declared {tuple(shape)}, "
                    f"the tensor's is {tuple(t.shape[1:])}"
                )
            if dtype is not None and dtype != t.dtype:
                raise SequenceSampleError(
                    f"key '{key}': dtype is declared {dtype}, the tensor's is {t.dtype}"
                )

    # ---- selection and keys ------------------------------------------------------------------

    def select(self, keys: Iterable[str]) -> SequenceSample:
        """A sample with only `keys` (tensors shared, not copied)."""
        keys = list(keys)
        missing = [k for k in keys if k not in self.seqlens]
        if missing:
            raise SequenceSampleError(f"keys {missing} not in sample (has {sorted(self.keys)})")
        return SequenceSample(
            ids=list(self.ids),
            seqlens={k: self.seqlens[k] for k in keys},
            data=None if self.data is None else {k: self.data[k] for k in keys},
            trailing_shapes={k: self.trailing_shapes[k] for k in keys if k in self.trailing_shapes},
            dtypes={k: self.dtypes[k] for k in keys if k in self.dtypes},
            metadata=dict(self.metadata),
        )

    def remap_keys(self, mapping: dict[str, str]) -> SequenceSample:
        """Rename keys: `mapping[old] = new`; keys not in the mapping keep their names."""

        def rn(k: str) -> str:
            return mapping.get(k, k)

        renamed = [rn(k) for k in self.seqlens]
        if len(set(renamed)) != len(renamed):
            raise SequenceSampleError(f"remapping {mapping} makes two keys share a name")
        return SequenceSample(
            ids=list(self.ids),
            seqlens={rn(k): v for k, v in self.seqlens.items()},
            data=None if self.data is None else {rn(k): v for k, v in self.data.items()},
            trailing_shapes={rn(k): v for k, v in self.trailing_shapes.items()},
            dtypes={rn(k): v for k, v in self.dtypes.items()},
            metadata=dict(self.metadata),
        )

    def update_(self, other: SequenceSample) -> None:
        """Merge in the keys (and metadata) of `other`, which must hold the same ids in order."""
        if list(other.ids) != list(self.ids):
            raise SequenceSampleError(
                f"cannot merge samples with different ids: {self.ids} vs {other.ids}"
            )
        if (self.data is None) != (other.data is None):
            raise SequenceSampleError("cannot merge a sample with tensors and one without")
        self.seqlens.update(other.seqlens)
        self.trailing_shapes.update(other.trailing_shapes)
        self.dtypes.update(other.dtypes)
        self.metadata.update(other.metadata)
        if self.data is not None and other.data is not None:
            self.data.update(other.data)
        self.validate()

    # ---- splitting and gathering -------------------------------------------------------------

    def _offsets(self, key: str) -> list[int]:
        return [0, *itertools.accumulate(sum(lens) for lens in self.seqlens[key])]

    def index(self, indices: Sequence[int]) -> SequenceSample:
        """The samples at `indices` (in that order), tensors copied into a new packing."""
        data = None
        if self.data is not None:
            data = {}
            for key, t in self.data.items():
                off = self._offsets(key)
                parts = [t[off[i] : off[i + 1]] for i in indices]
                data[key] = torch.cat(parts) if parts else t[:0]
        return SequenceSample(
            ids=[self.ids[i] for i in indices],
            seqlens={k: [list(v[i]) for i in indices] for k, v in self.seqlens.items()},
            data=data,
            trailing_shapes=dict(self.trailing_shapes),
            dtypes=dict(self.dtypes),
            metadata={k: [v[i] for i in indices] for k, v in self.metadata.items()},
        )

    def unpack(self) -> list[SequenceSample]:
        """One SequenceSample per sample."""
        return [self.index([i]) for i in range(self.bs)]

    @classmethod
    def gather(
        cls, samples: Sequence[SequenceSample], keys: Iterable[str] | None = None
    ) -> SequenceSample:
        """Concatenate samples (all with the same keys, or restricted to `keys`)."""
        if not samples:
            raise SequenceSampleError("cannot gather an empty list of samples")
        keys = sorted(samples[0].keys if keys is None else set(keys))
        for s in samples:
            if not set(keys) <= s.keys:
                raise SequenceSampleError(
                    f"cannot gather: sample with ids {s.ids} lacks keys {sorted(set(keys) - s.keys)}"
                )
        for k in keys:  # torch.cat would promote a dtype silently
            declared = {
                (str(s.dtypes[k]) if k in s.dtypes else None, s.trailing_shapes.get(k))
                for s in samples
            }
            declared = {d for d in declared if d != (None, None)}
            if len(declared) > 1:
                raise SequenceSampleError(
                    f"cannot gather key '{k}': the samples disagree on its (dtype, trailing "
                    f"shape): {sorted(declared, key=str)}"
                )
        with_data = [s.data is not None for s in samples]
        if any(with_data) and not all(with_data):
            raise SequenceSampleError("cannot gather samples with tensors and samples without")
        meta_keys = set(samples[0].metadata)
        for s in samples:
            meta_keys &= set(s.metadata)
        return cls(
            ids=[i for s in samples for i in s.ids],
            seqlens={k: [list(x) for s in samples for x in s.seqlens[k]] for k in keys},
            data=None
            if not all(with_data)
            else {
                k: torch.cat([s.data[k] for s in samples])
                for k in keys  # type: ignore[index]
            },
            trailing_shapes={
                k: samples[0].trailing_shapes[k] for k in keys if k in samples[0].trailing_shapes
            },
            dtypes={k: samples[0].dtypes[k] for k in keys if k in samples[0].dtypes},
            metadata={k: [x for s in samples for x in s.metadata[k]] for k in sorted(meta_keys)},
        )

    def split(self, k: int, min_size: int = 1) -> list[SequenceSample]:
        """Split into `k` contiguous parts with the largest part's token count as small as
        possible, each part holding at least `min_size` samples."""
        return [
            self.index(range(a, b))
            for a, b in balanced_partition(self.sample_tokens(), k, min_size)
        ]

    def split_by_token_budget(self, max_tokens: int) -> list[SequenceSample]:
        """Split into as few contiguous micro-batches as possible with at most `max_tokens` each.
        A sample larger than the budget gets a micro-batch of its own."""
        if max_tokens <= 0:
            raise SequenceSampleError(f"max_tokens ({max_tokens}) must be positive")
        bounds, start, acc = [], 0, 0
        for i, n in enumerate(self.sample_tokens()):
            if i > start and acc + n > max_tokens:
                bounds.append((start, i))
                start, acc = i, 0
            acc += n
        bounds.append((start, self.bs))
        return [self.index(range(a, b)) for a, b in bounds if b > a]

    def __repr__(self) -> str:
        shapes = {k: self.total_tokens(k) for k in sorted(self.seqlens)}
        return f"SequenceSample(bs={self.bs}, tokens={shapes}, data={'yes' if self.data else 'no'})"


def cu_seqlens_from_lengths(
    lengths: Sequence[int] | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """(n + 1,) int32 cumulative lengths starting at 0."""
    lens = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> list[int]:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


def balanced_partition(costs: Sequence[int], k: int, min_size: int = 1) -> list[tuple[int, int]]:
    """Cut `costs` into `k` contiguous [start, end) ranges of at least `min_size` items each,
    minimising the largest range sum. Exact (dynamic programming, O(k n^2); O(k) when every
    cost is the same); ties go to the earliest cut points."""
    n = len(costs)
    if k <= 0 or min_size <= 0:
        raise SequenceSampleError(f"k ({k}) and min_size ({min_size}) must be positive")
    if k * min_size > n:
        raise SequenceSampleError(
            f"cannot split {n} samples into {k} parts of at least {min_size} samples each"
        )
    if all(c == costs[0] for c in costs):
        return _equal_partition(n, k, min_size, costs[0] == 0)
    return _dp_partition(costs, k, min_size)


def _equal_partition(n: int, k: int, min_size: int, zero: bool) -> list[tuple[int, int]]:
    """`_dp_partition`'s answer for n equal costs, in closed form. The best largest sum of i
    items in j parts is ceil(i / j) items' (>= min_size, as i >= j * min_size), so the DP's
    last cut of i items into j parts is the earliest s >= (j - 1) * min_size with i - s <=
    ceil(i / j) (then s / (j - 1) <= ceil(i / j) holds too): max(i - ceil(i / j), (j - 1) *
    min_size). With zero costs every cut ties, and the earliest is (j - 1) * min_size."""
    bounds, i = [], n
    for j in range(k, 0, -1):
        s = (j - 1) * min_size if zero else max(i - -(-i // j), (j - 1) * min_size)
        bounds.append((s, i))
        i = s
    return bounds[::-1]


def _dp_partition(costs: Sequence[int], k: int, min_size: int) -> list[tuple[int, int]]:
    n = len(costs)
    prefix = [0, *itertools.accumulate(costs)]
    inf = float("inf")
    # best[j][i]: minimal max-sum splitting the first i items into j parts; cut[j][i]: last start.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for j in range(1, k + 1):
        for i in range(j * min_size, n - (k - j) * min_size + 1):
            for s in range((j - 1) * min_size, i - min_size + 1):
                value = max(best[j - 1][s], prefix[i] - prefix[s])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, s
    bounds, i = [], n
    for j in range(k, 0, -1):
        s = cut[j][i]
        bounds.append((s, i))
        i = s
    return bounds[::-1]
