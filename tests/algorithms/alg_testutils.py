"""Random packed batches for the realflow.algorithms tests (plain Python lists in, tensors out)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st


@dataclass
class Packed:
    """B sequences: full lengths ``lens`` and prompt lengths ``prompts`` (1 <= P < L)."""

    lens: list[int]
    prompts: list[int]

    @property
    def cu(self) -> torch.Tensor:
        out = [0]
        for n in self.lens:
            out.append(out[-1] + n)
        return torch.tensor(out, dtype=torch.int32)

    @property
    def t1(self) -> int:
        return sum(n - 1 for n in self.lens)

    def mask_list(self) -> list[list[int]]:
        """Per sequence, the L-1 loss-mask entries written out by hand."""
        return [[0] * (p - 1) + [1] * (n - p) for n, p in zip(self.lens, self.prompts)]

    def mask(self) -> torch.Tensor:
        return torch.tensor([v for m in self.mask_list() for v in m], dtype=torch.bool)

    def split_t1(self, x: torch.Tensor) -> list[list[float]]:
        """Cut a [T1] tensor into per-sequence Python lists."""
        out, s = [], 0
        for n in self.lens:
            out.append([float(v) for v in x[s : s + n - 1]])
            s += n - 1
        return out


@st.composite
def packed_batches(draw, max_b: int = 5, max_len: int = 9) -> Packed:
    b = draw(st.integers(1, max_b))
    lens = draw(st.lists(st.integers(2, max_len), min_size=b, max_size=b))
    prompts = [draw(st.integers(1, n - 1)) for n in lens]
    return Packed(lens, prompts)


def randn(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=dtype)
