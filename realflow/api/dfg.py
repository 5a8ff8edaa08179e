"""Model function calls (MFCs) and the dataflow graph (DFG) built from their keys.

An MFC is one call kind (`generate`, `inference`, `train_step`) on one model. The DFG of one
iteration has an edge A -> B when B reads a key that A writes; keys nobody writes come from the
dataset. `build_dfg` checks the graph and names the node and key of every problem.

Keys are global names. `input_key_remap` maps a global key to the name the interface sees;
`output_key_remap` maps the interface's output name to the global key (e.g. a ref model's
`logprobs` become `ref_logprobs`).

One MFC may be the *filter* of a sampling loop (`MFCDef.filter_loop`): it returns only the
samples that qualify, and the MFCs upstream of it (the loop) run again on fresh dataset batches
until `n_seqs` samples qualified; the rest of the graph then runs once on those (see
docs/runtime.md, "Sampling loops").
"""

from __future__ import annotations

import dataclasses
import enum
import html
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import networkx as nx


class InterfaceType(str, enum.Enum):
    """What a worker can be asked to do with a model: the declared RPC surface."""

    GENERATE = "generate"
    INFERENCE = "inference"
    TRAIN_STEP = "train_step"
    EVALUATE = "evaluate"  # statistics of a batch under the current weights; writes no keys


class DFGError(ValueError):
    """A dataflow graph that cannot run: the message names the node and the key."""


@dataclasses.dataclass
class InterfaceSpec:
    """A registered interface name and the keyword arguments it is built with."""

    type_: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MicroBatchSpec:
    """How an MFC splits its batch: at least `n_mbs` micro-batches, each holding at most
    `max_tokens_per_mb` tokens (None: no token budget)."""

    n_mbs: int = 1
    max_tokens_per_mb: int | None = None


@dataclasses.dataclass
class FilterLoop:
    """Makes an MFC the filter of a sampling loop (DAPO's dynamic sampling, for one).

    The MFC's interface returns the subset of its input samples that qualify (possibly none);
    the MFC writes no keys. The MFCs it depends on, directly or not, form the loop: while fewer
    than `n_seqs` samples of the step have qualified, the master loads another dataset batch and
    runs the loop on it, at most `max_rounds` batches per step. The other MFCs then run once, on
    exactly `n_seqs` samples: the first that qualified, in order, or, when the last batch still
    leaves the step short, topped up with that batch's samples that did not qualify.
    """

    max_rounds: int

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise DFGError(f"FilterLoop.max_rounds ({self.max_rounds}) must be >= 1")


@dataclasses.dataclass
class MFCDef:
    """One node of the DFG."""

    name: str
    model_name: str
    interface_type: InterfaceType
    interface_impl: InterfaceSpec
    n_seqs: int
    input_keys: tuple[str, ...] = ()
    output_keys: tuple[str, ...] = ()
    input_key_remap: dict[str, str] = dataclasses.field(default_factory=dict)
    output_key_remap: dict[str, str] = dataclasses.field(default_factory=dict)
    mb_spec: MicroBatchSpec = dataclasses.field(default_factory=MicroBatchSpec)
    filter_loop: FilterLoop | None = None  # this MFC filters a sampling loop (see FilterLoop)

    def __post_init__(self) -> None:
        if self.interface_type not in {t.value for t in InterfaceType}:
            raise DFGError(
                f"MFC '{self.name}': interface_type {self.interface_type!r} is not one of "
                f"{', '.join(t.value for t in InterfaceType)}"
            )
        self.interface_type = InterfaceType(self.interface_type)
        self.input_keys = tuple(self.input_keys)
        self.output_keys = tuple(self.output_keys)
        if self.n_seqs <= 0:
            raise DFGError(f"MFC '{self.name}': n_seqs ({self.n_seqs}) must be positive")

    @property
    def is_train(self) -> bool:
        return self.interface_type == InterfaceType.TRAIN_STEP

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_name": self.model_name,
            "interface_type": self.interface_type.value,
            "interface_impl": {
                "type_": self.interface_impl.type_,
                "args": self.interface_impl.args,
            },
            "input_keys": list(self.input_keys),
            "output_keys": list(self.output_keys),
            "input_key_remap": dict(self.input_key_remap),
            "output_key_remap": dict(self.output_key_remap),
            "n_seqs": self.n_seqs,
            "mb_spec": dataclasses.asdict(self.mb_spec),
            "filter_loop": None
            if self.filter_loop is None
            else dataclasses.asdict(self.filter_loop),
        }


class DataflowGraph:
    """The checked DFG of one iteration: a networkx DiGraph whose nodes are MFC names (with the
    MFCDef under the `mfc` attribute) and whose edges carry the `keys` they pass."""

    def __init__(self, graph: nx.DiGraph, dataset_keys: frozenset[str]):
        self.graph = graph
        self.dataset_keys = dataset_keys
        self.order: list[str] = list(nx.lexicographical_topological_sort(graph, key=self._rank))
        filters = [n for n in self.order if self.mfc(n).filter_loop is not None]
        self.filter: MFCDef | None = self.mfc(filters[0]) if filters else None
        # The sampling loop: the filter and every MFC it depends on (empty without a filter).
        self.loop: frozenset[str] = (
            frozenset({filters[0], *nx.ancestors(graph, filters[0])}) if filters else frozenset()
        )

    def _rank(self, name: str) -> int:
        return self.graph.nodes[name]["index"]

    @property
    def mfcs(self) -> list[MFCDef]:
        """MFCs in execution (topological) order."""
        return [self.graph.nodes[n]["mfc"] for n in self.order]

    def mfc(self, name: str) -> MFCDef:
        return self.graph.nodes[name]["mfc"]

    def producer(self, key: str) -> str | None:
        """The MFC that writes `key`, or None for a dataset key."""
        for name in self.order:
            if key in self.mfc(name).output_keys:
                return name
        return None

    def consumers(self, key: str) -> list[str]:
        return [n for n in self.order if key in self.mfc(n).input_keys]

    def sources(self) -> list[str]:
        """MFCs that read only dataset keys."""
        return [n for n in self.order if self.graph.in_degree(n) == 0]

    def edges(self) -> list[dict[str, Any]]:
        return [
            {"src": u, "dst": v, "keys": list(d["keys"])}
            for u, v, d in sorted(
                self.graph.edges(data=True), key=lambda e: (self._rank(e[0]), self._rank(e[1]))
            )
        ]

    def to_json(self) -> dict[str, Any]:
        return {"nodes": [m.to_json() for m in self.mfcs], "edges": self.edges()}

    def loop_summary(self) -> str:
        """One line saying what the sampling loop does; empty without one."""
        if self.filter is None:
            return ""
        body = [n for n in self.order if n in self.loop and n != self.filter.name]
        return (
            f"loop: {', '.join(body) or '(dataset only)'} -> {self.filter.name} repeat on fresh "
            f"batches until n_seqs samples pass {self.filter.name} (at most "
            f"{self.filter.filter_loop.max_rounds} batches a step); the other MFCs run after it"
        )

    def summary(self) -> str:
        """A readable table of the nodes and the edges."""
        lines = [f"dataset keys: {', '.join(sorted(self.dataset_keys)) or '(none)'}"]
        for m in self.mfcs:
            lines.append(
                f"  {m.name:<14} {m.interface_type.value:<10} on {m.model_name:<8} "
                f"[{m.interface_impl.type_}] n_seqs={m.n_seqs}  "
                f"in: {', '.join(m.input_keys) or '-'}  out: {', '.join(m.output_keys) or '-'}"
            )
        for e in self.edges():
            lines.append(f"  {e['src']} -> {e['dst']}  ({', '.join(e['keys'])})")
        if self.filter is not None:
            lines.append("  " + self.loop_summary())
        return "\n".join(lines)

    def to_dot(self) -> str:
        colors = {"generate": "#cfe8ff", "inference": "#e2f5d8", "train_step": "#ffe0c2"}
        rows = ["digraph dfg {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled"];']
        rows.append('  dataset [shape=cylinder, fillcolor="#eeeeee"];')
        for m in self.mfcs:
            label = f"{m.name}\\n{m.interface_type.value} {m.model_name}"
            rows.append(
                f'  "{m.name}" [label="{label}", fillcolor="{colors[m.interface_type.value]}"];'
            )
        for m in self.mfcs:
            from_data = [k for k in m.input_keys if k in self.dataset_keys]
            if from_data:
                rows.append(f'  dataset -> "{m.name}" [label="{", ".join(from_data)}"];')
        for e in self.edges():
            rows.append(f'  "{e["src"]}" -> "{e["dst"]}" [label="{", ".join(e["keys"])}"];')
        rows.extend(self._loop_dot())
        rows.append("}")
        return "\n".join(rows) + "\n"

    def _loop_dot(self) -> list[str]:
        """Dashed edges of the sampling loop: back to the loop's sources, and on to the MFCs that
        wait for it (those outside the loop that read a key the loop writes)."""
        if self.filter is None:
            return []
        f = self.filter.name
        rounds = self.filter.filter_loop.max_rounds
        rows = [
            f'  "{f}" -> "{n}" [style=dashed, constraint=false, label="refill (<= {rounds} batches)"];'
            for n in self.order
            if n in self.loop and n != f and self.graph.in_degree(n) == 0
        ]
        for n in self.order:
            if n not in self.loop and any(p in self.loop for p in self.graph.predecessors(n)):
                rows.append(f'  "{f}" -> "{n}" [style=dashed, label="n_seqs passed"];')
        return rows

    def to_svg(self) -> str:
        """A layered SVG picture (no graphviz needed): one row per topological generation."""
        generations = [sorted(g, key=self._rank) for g in nx.topological_generations(self.graph)]
        box_w, box_h, gap_x, gap_y = 190, 48, 40, 70
        width = max((len(g) for g in generations), default=0) * (box_w + gap_x) + gap_x
        height = len(generations) * (box_h + gap_y) + gap_y
        pos: dict[str, tuple[float, float]] = {}
        for row, names in enumerate(generations):
            offset = (width - len(names) * (box_w + gap_x) + gap_x) / 2
            for col, name in enumerate(names):
                pos[name] = (offset + col * (box_w + gap_x), gap_y / 2 + row * (box_h + gap_y))
        colors = {"generate": "#cfe8ff", "inference": "#e2f5d8", "train_step": "#ffe0c2"}
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
            '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z"/></marker></defs>',
        ]
        for e in self.edges():
            (x1, y1), (x2, y2) = pos[e["src"]], pos[e["dst"]]
            sx, sy, tx, ty = x1 + box_w / 2, y1 + box_h, x2 + box_w / 2, y2
            out.append(
                f'<line x1="{sx}" y1="{sy}" x2="{tx}" y2="{ty}" stroke="#555" marker-end="url(#a)"/>'
            )
            label = html.escape(", ".join(e["keys"]))
            out.append(
                f'<text x="{(sx + tx) / 2 + 4}" y="{(sy + ty) / 2}" fill="#555" font-size="10">{label}</text>'
            )
        for m in self.mfcs:
            x, y = pos[m.name]
            out.append(
                f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="8" fill="{colors[m.interface_type.value]}" stroke="#333"/>'
            )
            out.append(
                f'<text x="{x + 10}" y="{y + 20}" font-weight="bold">{html.escape(m.name)}</text>'
            )
            out.append(
                f'<text x="{x + 10}" y="{y + 38}">{m.interface_type.value} on {html.escape(m.model_name)}</text>'
            )
        out.append("</svg>")
        return "\n".join(out) + "\n"


def build_dfg(mfcs: Sequence[MFCDef], dataset_keys: Iterable[str] | None = None) -> DataflowGraph:
    """Build and check the DFG of `mfcs`.

    With `dataset_keys`, every input key must be written by an MFC or provided by the dataset;
    without, keys nobody writes are taken to come from the dataset. Raises DFGError naming the
    node and the key for: duplicate MFC names, a key written by two MFCs, a missing input key, a
    cycle.
    """
    errors: list[str] = []
    names = [m.name for m in mfcs]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"two MFCs are named '{name}'")
    writer: dict[str, str] = {}
    for m in mfcs:
        for key in m.output_keys:
            if key in writer and writer[key] != m.name:
                errors.append(f"key '{key}' is written by both '{writer[key]}' and '{m.name}'")
            writer.setdefault(key, m.name)
    read_keys = {k for m in mfcs for k in m.input_keys}
    if dataset_keys is None:
        provided = frozenset(read_keys - set(writer))
    else:
        provided = frozenset(dataset_keys)
        for m in mfcs:
            for key in m.input_keys:
                if key not in writer and key not in provided:
                    errors.append(
                        f"MFC '{m.name}' reads key '{key}', which no MFC writes and the dataset "
                        f"does not provide (dataset keys: {sorted(provided)})"
                    )
    errors.extend(_filter_loop_errors(mfcs))
    if errors:
        raise DFGError("invalid dataflow graph:\n  " + "\n  ".join(errors))

    graph = nx.DiGraph()
    for i, m in enumerate(mfcs):
        graph.add_node(m.name, mfc=m, index=i)
    for m in mfcs:
        for key in m.input_keys:
            src = writer.get(key)
            if src is None:
                continue
            if src == m.name:
                raise DFGError(f"MFC '{m.name}' reads key '{key}' that it writes itself")
            if graph.has_edge(src, m.name):
                graph.edges[src, m.name]["keys"].append(key)
            else:
                graph.add_edge(src, m.name, keys=[key])
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        hops = ", ".join(f"'{u}' -> '{v}' via {graph.edges[u, v]['keys']}" for u, v in cycle)
        raise DFGError(f"invalid dataflow graph: cycle {hops}")
    for m in mfcs:
        if m.filter_loop is not None:
            trained = sorted(
                n for n in nx.ancestors(graph, m.name) if graph.nodes[n]["mfc"].is_train
            )
            if trained:
                raise DFGError(
                    f"invalid dataflow graph: the sampling loop of filter '{m.name}' holds "
                    f"train_step MFCs {trained}; a loop may only generate and score"
                )
    return DataflowGraph(graph, provided)


def _filter_loop_errors(mfcs: Sequence[MFCDef]) -> list[str]:
    filters = [m for m in mfcs if m.filter_loop is not None]
    errors = []
    if len(filters) > 1:
        errors.append(
            f"MFCs {[m.name for m in filters]} all have a filter_loop; a graph may have one"
        )
    for m in filters:
        if m.is_train:
            errors.append(f"MFC '{m.name}' is a train_step and cannot filter a sampling loop")
        if m.output_keys:
            errors.append(
                f"filter MFC '{m.name}' writes keys {list(m.output_keys)}; a filter writes none "
                "(samples topped up at the max_rounds cap would lack them)"
            )
    return errors


def write_dfg_files(dfg: DataflowGraph, directory: str) -> None:
    """Write dfg.json, dfg.dot and dfg.svg into `directory`."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "dfg.json"), "w") as f:
        json.dump(dfg.to_json(), f, indent=2)
    with open(os.path.join(directory, "dfg.dot"), "w") as f:
        f.write(dfg.to_dot())
    with open(os.path.join(directory, "dfg.svg"), "w") as f:
        f.write(dfg.to_svg())
