"""The master with a mesh allocation, against a transport that answers at once and records every
request: where realloc steps go (the parameter-version rule), which parts each dp rank gets,
and in which order each worker sees its requests."""

from __future__ import annotations

import torch

from realflow.api.data import SequenceSample
from realflow.api.dfg import InterfaceSpec, MFCDef, build_dfg
from realflow.experiments.allocation import MeshPlan
from realflow.parallel.layout import Mesh
from realflow.system.master import Master
from realflow.system.mesh import ReallocRequest, ReallocResult
from realflow.system.worker import Kind, MFCRequest, MFCResult

N = 6
LENGTHS = [6, 1, 1, 1, 1, 2]  # dp=2 by tokens: [0] | [1..5] (6 and 6 tokens), not 3 + 3 samples


def sample_meta(ids: list, key: str, lengths: list[int]) -> SequenceSample:
    seqs = {key: [torch.zeros(n, dtype=torch.long) for n in lengths]}
    return SequenceSample.from_sequences(ids, seqs).meta()


class RecordingTransport:
    """Every request answered at once, as a worker would answer it (metadata only)."""

    sends_data = True

    def __init__(self, mfcs: dict[str, MFCDef], plan: MeshPlan):
        self.mfcs, self.plan = mfcs, plan
        self.log: list[tuple[int, Kind, object]] = []
        self.results: dict[int, object] = {}
        self.versions: dict[tuple[str, str], int] = {}  # (role, mesh) -> version held
        self.read: dict[str, list[tuple[int, int]]] = {}  # MFC -> (step, version) per call

    def submit(self, worker, kind, payload=None, frees=()):
        handle = len(self.log)
        self.log.append((worker, kind, payload))
        self.results[handle] = self._answer(worker, kind, payload)
        return handle

    def _answer(self, worker: int, kind: Kind, payload):
        if kind == Kind.FETCH_BATCH:
            return sample_meta(list(range(N)), "prompt", LENGTHS)
        if kind == Kind.REALLOC:
            self.versions[(payload.role, payload.dst)] = payload.version
            return ReallocResult(payload, worker, 0.0, 0.0, 0, 0, 0)
        if kind != Kind.MFC:
            return None
        req: MFCRequest = payload
        mfc = self.mfcs[req.mfc]
        mesh = self.plan.meshes[mfc.name]
        key = (mfc.model_name, str(mesh))
        version = self.versions.get(key, 0)
        self.read.setdefault(mfc.name, []).append((req.step, version))
        if mfc.is_train and worker == mesh.workers[-1]:  # one count for the dp ranks
            self.versions[key] = version + 1
        meta = None
        if mfc.output_keys:
            lengths = [LENGTHS[i] for i in req.ids]
            meta = sample_meta(req.ids, mfc.output_keys[0], lengths)
        stats = {"n": float(len(req.ids)), "worker": float(worker)}
        return MFCResult(mfc.name, req.step, worker, meta, stats, 0.0, 0.0, 0, version)

    def wait(self, handles, timeout):
        return list(handles)

    def result(self, handle):
        return self.results.pop(handle)


def node(name, kind, inputs, outputs=()):
    return MFCDef(name, "actor", kind, InterfaceSpec("x"), N, inputs, outputs)


def run_master(steps: int, first: int = 1) -> tuple[RecordingTransport, dict[int, dict]]:
    mfcs = [
        node("gen", "generate", ("prompt",), ("seq",)),
        node("train", "train_step", ("seq",)),
    ]
    plan = MeshPlan(
        meshes={"gen": Mesh.parse("d1t1p1@2"), "train": Mesh.parse("d2t1p1@0-1")},
        roles={"gen": "actor", "train": "actor"},
        train_mesh={"actor": Mesh.parse("d2t1p1@0-1")},
    )
    dfg = build_dfg(mfcs, ["prompt"])
    transport = RecordingTransport({m.name: m for m in mfcs}, plan)
    reallocs: list[ReallocResult] = []
    master = Master(dfg, transport, {"actor": 2}, 2, mesh_plan=plan, on_realloc=reallocs.append)  # type: ignore[arg-type]
    rows: dict[int, dict] = {}
    if first > 1:  # resumed: the copies hold the checkpoint's version
        transport.versions = {("actor", "d2t1p1@0-1"): first - 1, ("actor", "d1t1p1@2"): first - 1}
    master.run(first, steps, lambda s, stats, _: rows.__setitem__(s, stats), lambda s: False, None)
    assert len(reallocs) == 3 * (steps - max(first, 2) + 1)  # every worker of both meshes
    return transport, rows


def test_realloc_runs_before_each_generation_on_a_stale_mesh_and_only_then():
    transport, _ = run_master(3)
    log = transport.log
    gens = [(i, p.step) for i, (w, k, p) in enumerate(log) if k == Kind.MFC and p.mfc == "gen"]
    trains = [i for i, (w, k, p) in enumerate(log) if k == Kind.MFC and p.mfc == "train"]
    reallocs = [(i, w, p) for i, (w, k, p) in enumerate(log) if k == Kind.REALLOC]
    # Step 1 generates with the weights every copy was built with: no realloc. Steps 2 and 3
    # move the version the previous train step made, on all workers of both meshes, after that
    # train step and before the generation.
    assert [s for _, s in gens] == [1, 2, 3]
    assert len(reallocs) == 6
    for step in (2, 3):
        mine = [(i, w, p) for i, w, p in reallocs if p.step == step]
        assert sorted(w for _, w, _ in mine) == [0, 1, 2]
        assert {p for _, _, p in mine} == {
            ReallocRequest("actor", "d2t1p1@0-1", "d1t1p1@2", step, step - 1)
        }
        gen_at = dict((s, i) for i, s in gens)[step]
        assert max(trains[: 2 * (step - 1)]) < min(i for i, _, _ in mine)
        assert max(i for i, _, _ in mine) < gen_at
    # The generation copy is freed after each generation (a realloc fills it again before the
    # next); the training copy never is.
    calls = [p for w, k, p in log if k == Kind.MFC]
    assert {(p.mfc, p.release_after) for p in calls} == {("gen", True), ("train", False)}
    # Each generation read the version of the step before it.
    assert transport.read["gen"] == [(1, 0), (2, 1), (3, 2)]
    assert transport.read["train"] == [(1, 0), (1, 0), (2, 1), (2, 1), (3, 2), (3, 2)]


def test_a_dp_mesh_gets_token_balanced_parts_and_its_stats_merge():
    transport, rows = run_master(1)
    trains = [(w, p) for w, k, p in transport.log if k == Kind.MFC and p.mfc == "train"]
    assert [(w, p.ids) for w, p in trains] == [(0, [0]), (1, [1, 2, 3, 4, 5])]
    # Worker 0 fetches sample 0's `seq` from the generation worker, worker 1 the rest: the
    # generation worker sends both (its SEND requests), each worker receives its own.
    sends = [(w, p[0], list(p[1].meta.ids)) for w, k, p in transport.log if k == Kind.SEND]
    assert sends == [(2, 0, [0]), (2, 1, [1, 2, 3, 4, 5])]
    for w, p in trains:
        assert [(dst, t.src, list(t.meta.ids)) for dst, t in p.moves] == [(w, 2, p.ids)]
    # stats: sample-weighted over the dp ranks (n: 1 and 5 samples; worker: 0 and 1)
    assert rows[1]["train"] == {"n": (1 * 1 + 5 * 5) / 6, "worker": (0 * 1 + 1 * 5) / 6}


def test_a_resumed_run_fills_the_generation_copy_from_the_training_copy_first():
    # The generation copy was rebuilt from the saved HF weights, which may be of a lower dtype
    # than the training copy's restored fp32 masters: the first generation reallocates.
    transport, _ = run_master(4, first=3)
    reallocs = [p for w, k, p in transport.log if k == Kind.REALLOC]
    assert sorted({(p.step, p.version) for p in reallocs}) == [(3, 2), (4, 3)]
    assert transport.read["gen"] == [(3, 2), (4, 3)]
