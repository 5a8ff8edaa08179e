"""Parallel layouts and device meshes: `d2t1p1`, `d1t2p1@0-1`.

A `Layout` is the degrees of data, tensor and pipeline parallelism of one model for one model
function call. A `Mesh` places a layout on workers (global ranks of the workers' process
group): `Mesh.parse("d1t2p2@0-3")`. Position i of `mesh.workers` holds the coordinates

    pp = i // (dp * tp),  dp = (i // tp) % dp,  tp = i % tp

so tensor-parallel peers are neighbours (one node, fast links) and pipeline stages are the
outermost axis, as in Megatron and ReaL. Pure Python: no torch import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

_LAYOUT_RE = re.compile(r"d(\d+)t(\d+)p(\d+)")
_PART_RE = re.compile(r"([dtp])(\d+)")


class Coords(NamedTuple):
    """A worker's place in a mesh: data-parallel rank, tensor-parallel rank, pipeline stage."""

    dp: int
    tp: int
    pp: int


@dataclass(frozen=True)
class Layout:
    """Degrees of data (`dp`), tensor (`tp`) and pipeline (`pp`) parallelism; `str` is d2t1p1."""

    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        bad = [f"{k}={v}" for k, v in (("dp", self.dp), ("tp", self.tp), ("pp", self.pp)) if v < 1]
        if bad:
            raise ValueError(f"layout degrees must be >= 1, got {', '.join(bad)}")

    @property
    def world_size(self) -> int:
        """Workers the layout needs: dp * tp * pp."""
        return self.dp * self.tp * self.pp

    def __str__(self) -> str:
        return f"d{self.dp}t{self.tp}p{self.pp}"

    @classmethod
    def parse(cls, text: str) -> Layout:
        """`d2t1p1` -> Layout(2, 1, 1). Every degree must be written, in the order d, t, p."""
        m = _LAYOUT_RE.fullmatch(text.strip())
        if m is None:
            raise ValueError(_layout_error(text))
        return cls(*(int(g) for g in m.groups()))


def _layout_error(text: str) -> str:
    msg = (
        f"layout {text!r} must be written d<dp>t<tp>p<pp> with positive integers, all three in "
        "that order (e.g. d2t1p1)"
    )
    parts = dict((k, int(v)) for k, v in _PART_RE.findall(text.strip().lower()))
    if parts and _PART_RE.sub("", text.strip().lower()) == "":
        guess = f"d{parts.get('d', 1)}t{parts.get('t', 1)}p{parts.get('p', 1)}"
        if guess != text.strip():
            msg += f"; did you mean '{guess}'?"
    return msg


def parse_workers(text: str) -> tuple[int, ...]:
    """`0-3` -> (0, 1, 2, 3); `0,2` -> (0, 2); `0-1,4-5` -> (0, 1, 4, 5). No repeats."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(
                f"workers {text!r}: {part!r} is not a worker index or a range a-b (e.g. 0-3 or 0,2)"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"workers {text!r}: range {part!r} runs backwards; write {hi}-{lo}")
        out.extend(range(lo, hi + 1))
    repeated = sorted({w for w in out if out.count(w) > 1})
    if repeated:
        raise ValueError(f"workers {text!r} lists worker(s) {repeated} more than once")
    return tuple(out)


def format_workers(workers: tuple[int, ...]) -> str:
    """Inverse of `parse_workers`, with runs written as ranges: (0, 1, 2, 5) -> '0-2,5'."""
    runs: list[list[int]] = []
    for w in workers:
        if runs and w == runs[-1][-1] + 1:
            runs[-1].append(w)
        else:
            runs.append([w])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


@dataclass(frozen=True)
class Mesh:
    """A layout placed on workers; see the module docstring for the coordinate order."""

    layout: Layout
    workers: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.workers) != self.layout.world_size:
            raise ValueError(
                f"layout {self.layout} needs dp*tp*pp = {self.layout.world_size} workers, got "
                f"{len(self.workers)} ({format_workers(self.workers)})"
            )
        if len(set(self.workers)) != len(self.workers) or min(self.workers) < 0:
            raise ValueError(f"mesh workers must be distinct and >= 0, got {self.workers}")

    @classmethod
    def parse(cls, text: str) -> Mesh:
        """`d1t2p1@0-1` -> Mesh(Layout(1, 2, 1), (0, 1))."""
        layout, sep, workers = text.strip().partition("@")
        if not sep:
            raise ValueError(
                f"allocation {text!r} must be <layout>@<workers>, e.g. d1t2p1@0-1 or d2t1p1@2,3"
            )
        return cls(Layout.parse(layout), parse_workers(workers))

    def __str__(self) -> str:
        return f"{self.layout}@{format_workers(self.workers)}"

    def __contains__(self, worker: int) -> bool:
        return worker in self.workers

    def coords(self, worker: int) -> Coords:
        """(dp, tp, pp) of a worker of this mesh."""
        if worker not in self.workers:
            raise ValueError(f"worker {worker} is not in mesh {self}")
        i = self.workers.index(worker)
        lay = self.layout
        return Coords(dp=(i // lay.tp) % lay.dp, tp=i % lay.tp, pp=i // (lay.dp * lay.tp))

    def worker(self, dp: int, tp: int, pp: int) -> int:
        lay = self.layout
        if not (0 <= dp < lay.dp and 0 <= tp < lay.tp and 0 <= pp < lay.pp):
            raise ValueError(f"coords (dp={dp}, tp={tp}, pp={pp}) are outside layout {lay}")
        return self.workers[(pp * lay.dp + dp) * lay.tp + tp]

    # Groups of workers along one axis (every group of that axis, in a fixed order).
    def tp_groups(self) -> list[tuple[int, ...]]:
        lay = self.layout
        return [
            tuple(self.worker(d, t, p) for t in range(lay.tp))
            for p in range(lay.pp)
            for d in range(lay.dp)
        ]

    def dp_groups(self) -> list[tuple[int, ...]]:
        lay = self.layout
        return [
            tuple(self.worker(d, t, p) for d in range(lay.dp))
            for p in range(lay.pp)
            for t in range(lay.tp)
        ]

    def pp_groups(self) -> list[tuple[int, ...]]:
        lay = self.layout
        return [
            tuple(self.worker(d, t, p) for p in range(lay.pp))
            for d in range(lay.dp)
            for t in range(lay.tp)
        ]

    def mp_groups(self) -> list[tuple[int, ...]]:
        """The tp x pp workers of each data-parallel replica (one model copy)."""
        lay = self.layout
        return [
            tuple(self.worker(d, t, p) for p in range(lay.pp) for t in range(lay.tp))
            for d in range(lay.dp)
        ]
