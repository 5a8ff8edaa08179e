"""A search problem (the MFCs of one experiment on one cluster) and a plan (an allocation
`<layout>@<devices>` for every MFC), with the cost lookups both the estimator and the simulator
use: each MFC's time on a mesh, realloc times, and memory per device.

A `Placement` is a layout on a contiguous range of devices `[lo, lo + n)`: either an aligned
power-of-two block inside one node (1, 2, 4, 8 devices) or whole consecutive nodes, as in ReaL.
Device indices are the worker indices of the written allocation (`d1t2p1@0-1`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from realflow.api.dfg import DataflowGraph, InterfaceType
from realflow.parallel.layout import Layout, Mesh, format_workers
from realflow.parallel.partition import layout_errors
from realflow.search import cost
from realflow.search.spec import Cluster, Link, ModelSpec


@dataclasses.dataclass(frozen=True)
class Placement:
    """`layout` on devices lo .. lo + n - 1 (n = layout.world_size)."""

    layout: Layout
    lo: int

    def __hash__(self) -> int:  # cached: placements key the cost caches of the search
        h = self.__dict__.get("_hash")
        if h is None:
            lay = self.layout
            h = self.__dict__["_hash"] = hash((lay.dp, lay.tp, lay.pp, self.lo))
        return h

    @functools.cached_property
    def n(self) -> int:
        return self.layout.world_size

    @property
    def workers(self) -> tuple[int, ...]:
        return tuple(range(self.lo, self.lo + self.n))

    @functools.cached_property
    def mask(self) -> int:
        return ((1 << self.n) - 1) << self.lo

    @property
    def mesh(self) -> Mesh:
        return Mesh(self.layout, self.workers)

    def __str__(self) -> str:
        return f"{self.layout}@{format_workers(self.workers)}"


Plan = dict[str, Placement]  # MFC name -> placement
ALL_RUNS_NODES = 32
REALLOC_SAMPLE = 256


@dataclasses.dataclass(frozen=True)
class Task:
    """One MFC as the search sees it; `model` is None for a weightless role (a rule-based
    scorer), which costs nothing and is pinned to device 0."""

    name: str
    role: str
    kind: str
    work: cost.Work
    model: ModelSpec | None
    deps: tuple[str, ...]  # MFCs of the same step it reads keys from
    rank: int  # position in the DFG's order (the master dispatches in this order)


class Problem:
    """The tasks of one step, the roles' models, which roles are trained, and the cluster."""

    def __init__(self, tasks: list[Task], cluster: Cluster):
        self.tasks = tasks
        self.by_name = {t.name: t for t in tasks}
        self.cluster = cluster
        self.trained = {t.role for t in tasks if t.kind == "train_step"}
        self.trainer = {t.role: t.name for t in tasks if t.kind == "train_step"}
        self.dev = cluster.device
        self.roles = sorted({t.role for t in tasks})

    # ---- per-MFC costs (cached: the search asks for the same ones over and over) -------------

    def links(self, p: Placement) -> cost.Links:
        """The link of each axis: a group of contiguous ascending devices shares a node when
        its first and last device do (tp groups: consecutive devices; dp: stride tp; pp:
        stride dp * tp)."""
        lay, c = p.layout, self.cluster

        def span(stride: int, size: int) -> Link:
            return c.link((p.lo, p.lo + stride * (size - 1)))

        return cost.Links(tp=span(1, lay.tp), pp=span(lay.dp * lay.tp, lay.pp),
                          dp=span(lay.tp, lay.dp))  # fmt: skip

    def _spans_nodes(self, p: Placement) -> bool:
        per = self.cluster.devices_per_node
        return p.lo // per != (p.lo + p.n - 1) // per

    @functools.cache  # noqa: B019
    def time(self, name: str, p: Placement) -> float:
        """Seconds of one call of MFC `name` on `p` (without realloc)."""
        links = self.links(p)
        return self._time(name, p.layout, links.tp.name, links.pp.name, links.dp.name)

    @functools.cache  # noqa: B019 (one problem per search; it lives as long)
    def _time(self, name: str, layout: Layout, tp: str, pp: str, dp: str) -> float:
        t = self.by_name[name]
        if t.model is None:
            return 0.0
        by_name = {self.cluster.intra.name: self.cluster.intra, self.cluster.inter.name:
                   self.cluster.inter}  # fmt: skip
        links = cost.Links(by_name[tp], by_name[pp], by_name[dp])
        return cost.mfc_time(t.model, layout, t.work, self.dev, links)

    @functools.cache  # noqa: B019
    def realloc_time(self, role: str, src: Placement, dst: Placement) -> float:
        """Moving the model's weights (compute dtype) from its training copy to `dst`: the
        slowest destination device's receive, or the busiest source's send. Meshes of more than
        `REALLOC_SAMPLE` devices are evaluated on that many evenly spaced destination devices."""
        model = self.by_name[self.trainer[role]].model
        if src == dst or model is None:
            return 0.0
        c = self.cluster
        got = cost.realloc_bytes(
            model, src.layout, src.workers, dst.layout, dst.workers, self.dev.param_bytes,
            sample=REALLOC_SAMPLE,
        )  # fmt: skip
        src_nodes = {c.node_of(src.lo), c.node_of(src.lo + src.n - 1)}
        worst = 0.0
        for w, nbytes in got.items():
            if nbytes <= 0:
                continue
            link = c.intra if src_nodes == {c.node_of(w)} else c.inter
            worst = max(worst, link.time(nbytes))
        total = sum(got.values()) * dst.n / len(got)
        lo, hi = min(src.lo, dst.lo), max(src.lo + src.n, dst.lo + dst.n) - 1
        send_link = c.intra if c.node_of(lo) == c.node_of(hi) else c.inter
        sender = send_link.time(total / src.n) if total > 0 else 0.0
        return max(worst, sender)

    # ---- memory -------------------------------------------------------------------------------

    @functools.cache  # noqa: B019
    def resident_bytes(self, role: str, p: Placement) -> float:
        """What a role keeps between calls on each device of its home placement: the training
        state of a trained role, the weights of one never trained."""
        model = next(t.model for t in self.tasks if t.role == role)
        if model is None:
            return 0.0
        return cost.weights_bytes(model, p.layout, self.dev, role in self.trained)

    @functools.cache  # noqa: B019
    def working_bytes(self, name: str, p: Placement, home: bool) -> float:
        """What a call needs on each device while it runs: activations / KV cache, plus a
        weight copy when `p` is not its role's home."""
        t = self.by_name[name]
        if t.model is None:
            return 0.0
        extra = 0.0 if home else cost.weights_bytes(t.model, p.layout, self.dev, False)
        return extra + cost.activation_bytes(t.model, p.layout, t.work, self.dev)

    def home(self, plan: Plan, role: str) -> Placement:
        """Where a role's weights live between calls: its train_step's placement, else its
        first call's."""
        if role in self.trainer:
            return plan[self.trainer[role]]
        return plan[next(t.name for t in self.tasks if t.role == role)]

    def memory_segments(self, plan: Plan) -> list[tuple[int, int, float]]:
        """(lo, hi, bytes): peak bytes on each device of lo .. hi - 1, over ranges of devices
        that hold the same placements: resident roles plus the largest working set of the
        calls that run there (one at a time)."""
        homes = {r: self.home(plan, r) for r in self.roles}
        out = []
        for lo, hi in _segments([plan[t.name] for t in self.tasks if t.model is not None]):
            resident = 0.0
            for r, h in homes.items():
                if h.lo <= lo < h.lo + h.n:
                    resident += self.resident_bytes(r, h)
            working = 0.0
            for t in self.tasks:
                p = plan[t.name]
                if p.lo <= lo < p.lo + p.n:
                    working = max(working, self.working_bytes(t.name, p, p == homes[t.role]))
            out.append((lo, hi, resident + working))
        return out

    def peak_memory(self, plan: Plan) -> dict[int, float]:
        """Peak bytes on every device the plan uses."""
        return {d: b for lo, hi, b in self.memory_segments(plan) for d in range(lo, hi)}

    def fits(self, plan: Plan) -> bool:
        limit = self.dev.memory * cost.USABLE_MEMORY
        return all(b <= limit for _, _, b in self.memory_segments(plan))

    # ---- candidates ---------------------------------------------------------------------------

    def layouts(self, name: str, n: int) -> list[Layout]:
        """Layouts of n devices MFC `name`'s model can take: tp a power of two within a node
        that the model's heads allow, pp <= n_layers."""
        model = self.by_name[name].model
        per = self.cluster.devices_per_node
        out = []
        tp = 1
        while tp <= min(n, per):
            if n % tp == 0:
                for pp in _divisors(n // tp):
                    lay = Layout(n // tp // pp, tp, pp)
                    if model is None or not layout_errors(model, lay):
                        out.append(lay)
            tp *= 2
        return out

    def ranges(self) -> list[tuple[int, int]]:
        """(lo, n) of every candidate device range: aligned power-of-two blocks of one node,
        and runs of whole nodes: every run up to `ALL_RUNS_NODES` nodes, aligned power-of-two
        runs beyond (the candidates would otherwise grow with the square of the nodes)."""
        c = self.cluster
        per = c.devices_per_node
        out = []
        n = 1
        while n <= per:
            if per % n == 0 and (n < per or c.nodes == 1):
                out.extend((node * per + i, n) for node in range(c.nodes) for i in range(0, per, n))
            n *= 2
        if per & (per - 1):  # a node size that is not a power of two: the whole node too
            out.extend((node * per, per) for node in range(c.nodes))
        for k in range(1, c.nodes + 1):
            if k == 1 and c.nodes == 1:
                continue  # already listed as the whole single node
            if c.nodes > ALL_RUNS_NODES and (k & (k - 1)):
                continue
            step = k if c.nodes > ALL_RUNS_NODES else 1
            out.extend((node * per, k * per) for node in range(0, c.nodes - k + 1, step))
        if c.nodes > ALL_RUNS_NODES:
            out.append((0, c.n_devices))  # the whole cluster is always a candidate
        return sorted(set(out))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _end(p: Placement) -> int:
    return p.lo + p.n


def _segments(placements: list[Placement]) -> list[tuple[int, int]]:
    """Device ranges over which the set of placements covering a device does not change."""
    cuts = sorted({p.lo for p in placements} | {_end(p) for p in placements})
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]


# ---- building a problem from an experiment ---------------------------------------------------------

KINDS = {InterfaceType.GENERATE: "generate", InterfaceType.INFERENCE: "inference",
         InterfaceType.TRAIN_STEP: "train_step"}  # fmt: skip


def problem_from_dfg(
    dfg: DataflowGraph,
    models: dict[str, ModelSpec | None],
    cluster: Cluster,
    prompt_len: int,
    gen_len: int,
    n_minibatches: int = 1,
    gradient_checkpointing: bool = False,
) -> Problem:
    """The tasks of `dfg`: every MFC's kind, batch and model. `models[role]` is None for a
    weightless role. Generation makes `gen_len` answer tokens after `prompt_len` prompt tokens;
    every later call reads prompt + answer."""
    tasks = []
    for i, m in enumerate(dfg.mfcs):
        if m.interface_type not in KINDS:
            raise ValueError(f"MFC '{m.name}': {m.interface_type.value} calls cannot be planned")
        if m.model_name not in models:
            raise ValueError(f"MFC '{m.name}': no model given for role '{m.model_name}'")
        kind = KINDS[m.interface_type]
        work = cost.Work(
            kind=kind,
            n_seqs=m.n_seqs,
            prompt_len=prompt_len,
            gen_len=gen_len,
            max_tokens_per_mb=m.mb_spec.max_tokens_per_mb or (1 << 30),
            n_minibatches=n_minibatches if kind == "train_step" else 1,
            gradient_checkpointing=gradient_checkpointing,
        )
        deps = tuple(sorted(dfg.graph.predecessors(m.name)))
        tasks.append(Task(m.name, m.model_name, kind, work, models[m.model_name], deps, i))
    return Problem(tasks, cluster)


def plan_to_allocation(plan: Plan) -> dict[str, str]:
    """`{mfc: "<layout>@<workers>"}` in the allocation syntax of docs/parallel.md."""
    return {name: str(p) for name, p in plan.items()}


def plan_from_allocation(allocation: dict[str, str]) -> Plan:
    """The inverse of `plan_to_allocation` for contiguous worker ranges."""
    out = {}
    for name, text in allocation.items():
        mesh = Mesh.parse(text)
        lo = mesh.workers[0]
        if mesh.workers != tuple(range(lo, lo + len(mesh.workers))):
            raise ValueError(
                f"allocation.{name} ({text}): the search plans contiguous workers only"
            )
        out[name] = Placement(mesh.layout, lo)
    return out


def describe(problem: Problem, plan: Plan) -> list[dict[str, Any]]:
    """One row per MFC: placement, call time, and realloc time before it."""
    rows = []
    for t in problem.tasks:
        p = plan[t.name]
        realloc = 0.0
        if t.kind != "train_step" and t.role in problem.trainer:
            realloc = problem.realloc_time(t.role, plan[problem.trainer[t.role]], p)
        rows.append({"mfc": t.name, "allocation": str(p), "call_s": problem.time(t.name, p),
                     "realloc_s": realloc})  # fmt: skip
    return rows


def memory_gb(problem: Problem, plan: Plan) -> float:
    return max(problem.peak_memory(plan).values()) / 1e9 if plan else 0.0
