"""The model worker: hosts roles, holds their data, runs model function calls.

Everything a worker can be asked is declared in `Kind`; the master sends `(Kind, payload)` pairs
through a transport and gets the return value back. A worker keeps the tensors of the samples it
produced (or fetched) in a store keyed by sample id; only metadata goes back to the master.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from realflow.api.data import SequenceSample
from realflow.api.dfg import InterfaceType, MFCDef
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES, METRICS, load_plugins
from realflow.experiments.allocation import MeshPlan
from realflow.experiments.common import ExperimentConfig
from realflow.system.devices import peak_memory_stats, reset_peak_memory
from realflow.system.mesh import MeshCopies, ReallocRequest, ReallocResult

logger = logging.getLogger(__name__)


class Kind(str, enum.Enum):
    """The RPC surface of a worker."""

    SETUP = "setup"
    FETCH_BATCH = "fetch_batch"  # next dataset batch into the store; returns its meta
    MFC = "mfc"  # run one model function call; returns MFCResult
    FREE = "free"  # drop keys of samples from the store
    SAVE = "save"  # write a checkpoint part
    LOAD = "load"  # restore engine, interface, RNG and loader state
    SEND = "send"  # ray mode: send tensors to a peer over torch.distributed
    STORE_SIZE = "store_size"  # number of (sample, key) entries held: for tests and leak checks
    GET_WEIGHTS = "get_weights"  # a copy of a role's weights and their version
    SET_WEIGHTS = "set_weights"  # load weights (and their version) into a copy role
    REALLOC = "realloc"  # mesh allocations: move a role's weights between meshes (ReallocRequest)


# Released data: a list of (sample ids, keys) to drop from a worker's store.
Frees = Sequence[tuple[list[Any], list[str]]]


@dataclasses.dataclass
class WorkerSpec:
    index: int
    config: ExperimentConfig
    roles: list[str]
    trained_roles: list[str]
    mfcs: list[MFCDef]  # the MFCs of the DFG that run on this worker
    serves_dataset: bool
    total_train_steps: int
    # The device this worker computes on: 'cpu' or 'cuda:<i>', set by the transport from the
    # run's `device` key (realflow/system/devices.py).
    device: str = "cpu"
    # A mesh allocation (realflow/experiments/allocation.py): the mesh of every MFC of the run.
    # None: each role on one worker (`roles`), the behaviour without layouts.
    mesh_plan: MeshPlan | None = None


@dataclasses.dataclass
class Transfer:
    """Keys of samples that live on worker `src` and must be fetched before an MFC."""

    src: int
    meta: SequenceSample  # ids and keys to fetch, without tensors


@dataclasses.dataclass
class MFCRequest:
    mfc: str
    step: int
    ids: list[Any]
    transfers: list[Transfer]
    round: int = 1  # the round of a sampling loop (see master.py): round r > 1 is seeded apart
    # Mesh MFCs: (dst, transfer) sends and receives this worker takes part in, in the order the
    # master gave every worker (one global order, so no pair of workers waits on each other).
    moves: list[tuple[int, Transfer]] = dataclasses.field(default_factory=list)
    # Mesh MFCs: free this copy's weights after the call (its last call of the step on a copy
    # that is not the training copy; the next realloc allocates them again).
    release_after: bool = False


@dataclasses.dataclass
class MFCResult:
    mfc: str
    step: int
    worker: int
    meta: SequenceSample | None
    stats: dict[str, float]
    start: float
    end: float
    store_size: int = 0  # (sample, key) entries the worker holds after the call: spots leaks
    version: int = 0  # the parameter version (train steps taken) of the model the call read


def call_seed(seed: int, step: int, name: str) -> int:
    """A seed for one call, the same in every run with this seed: resume replays it exactly."""
    digest = hashlib.sha256(f"{seed}:{step}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


class ModelWorker:
    """One worker. `fetch_remote(transfer)` returns the tensors of a Transfer (transport-given)."""

    def __init__(
        self, spec: WorkerSpec, fetch_remote: Callable[[Transfer], SequenceSample] | None = None
    ):
        self.spec = spec
        self.index = spec.index
        self.fetch_remote = fetch_remote
        # sample id -> key -> that key of that one sample; and the sample's merged metadata. Per
        # key, so that storing, reading and freeing cost what they touch, not all keys held.
        self.store: dict[Any, dict[str, SequenceSample]] = {}
        self.store_metadata: dict[Any, dict[str, list[Any]]] = {}
        self.models: dict[str, Model] = {}
        self.interfaces: dict[str, ModelInterface] = {}
        self.mfcs = {m.name: m for m in spec.mfcs}
        self.loader = None
        self.eval_loader = None
        self._handlers = {
            Kind.SETUP: self.setup,
            Kind.FETCH_BATCH: self.fetch_batch,
            Kind.MFC: self.run_mfc,
            Kind.FREE: lambda _: None,  # the frees ride along with the request itself
            Kind.SAVE: self.save,
            Kind.LOAD: self.load,
            Kind.STORE_SIZE: self.store_size,
            Kind.SEND: self.send,
            Kind.GET_WEIGHTS: self.get_weights,
            Kind.SET_WEIGHTS: self.set_weights,
            Kind.REALLOC: self.realloc,
        }
        self.dp_group = None
        self.mesh: MeshCopies | None = None  # with a mesh allocation
        self.offloaded: set[str] = set()
        self.metric_fns: list[tuple[str, Any]] = []

    def handle(self, kind: Kind, payload: Any = None, frees: Frees = ()) -> Any:
        """Run one request. `frees` ride along with it: (ids, keys) the master has released
        since it last talked to this worker, dropped first (saves a round trip per free)."""
        self.free(frees)
        if self.spec.device.startswith("cuda"):
            # The current CUDA device is per thread, and a compute thread may serve any worker.
            torch.cuda.set_device(self.spec.device)
        return self._handlers[kind](payload)

    # ---- setup ------------------------------------------------------------------------------

    def setup(self, _: Any = None) -> dict[str, int]:
        cfg = self.spec.config
        load_plugins(cfg.plugins)  # a Ray actor is a fresh process: users' registrations too
        self.metric_fns = [(n, METRICS.get(n)) for n in cfg.metrics]
        roles = cfg.roles()
        if self.spec.mesh_plan is not None:
            self.mesh = MeshCopies(self.index, self.spec.mesh_plan)
            torch.manual_seed(cfg.seed)
            device = torch.device(self.spec.device)
            self.models = self.mesh.build(cfg, self.spec.total_train_steps, device)
        else:
            self._build_roles()
        # Roles with <role>.offload: weights (and optimizer state) leave the device between calls.
        self.offloaded = {
            n
            for n in self.spec.roles
            if roles[n].config.offload and self.models[n].module is not None
        }
        for n in self.offloaded:
            self.models[n].module.offload()
        for mfc in self.spec.mfcs:
            self.interfaces[mfc.name] = INTERFACES.get(mfc.interface_impl.type_)(
                **mfc.interface_impl.args
            )
        if self.spec.serves_dataset:
            self._setup_loader()
            rows = len(self.eval_loader.dataset) if self.eval_loader is not None else 0
            return {"eval_batches": self._eval_batches(), "eval_rows": rows}
        return {}

    def _build_roles(self) -> None:
        """Each role of this worker, whole, on this worker (no mesh allocation)."""
        from realflow.system.models import build_model

        cfg = self.spec.config
        roles = cfg.roles()
        if torch.distributed.is_initialized():
            # Every rank creates every group, in the same order (a collective call). Each model
            # lives on one worker here, so its data-parallel group is this rank alone.
            world = torch.distributed.get_world_size()
            groups = [torch.distributed.new_group([r]) for r in range(world)]
            self.dp_group = groups[torch.distributed.get_rank()]
        torch.manual_seed(cfg.seed)
        # A role on another role's base weights (`base_of`) is built after its owner.
        for name in sorted(self.spec.roles, key=lambda r: bool(roles[r].config.base_of)):
            owner = roles[name].config.base_of
            self.models[name] = build_model(
                name,
                roles[name],
                name in self.spec.trained_roles,
                self.spec.total_train_steps,
                cfg.seed,
                self.dp_group,
                device=torch.device(self.spec.device),
                base_owner=self.models[owner] if owner else None,
            )

    def _setup_loader(self) -> None:
        from realflow.data.loader import DataLoader

        cfg = self.spec.config
        d = cfg.dataset
        self.loader = DataLoader(
            self._dataset(d.path), cfg.n_seqs, shuffle=d.shuffle, seed=cfg.seed
        )
        self.eval_loader = None
        if cfg.eval_freq_steps > 0:
            self.eval_loader = DataLoader(
                self._dataset(cfg.eval_dataset_path()),
                cfg.eval_dataset.n_seqs or cfg.n_seqs,
                shuffle=False,
                drop_last=False,
            )

    def _dataset(self, path: str) -> Any:
        cfg = self.spec.config
        source = [m for m in self.spec.mfcs if set(m.input_keys) <= set(cfg.dataset_keys)]
        tokenizer = self.models[source[0].model_name].tokenizer if source else None
        if tokenizer is None:
            from realflow.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer("builtin")
        return cfg.build_dataset(tokenizer, path)

    def _eval_batches(self) -> int:
        if self.eval_loader is None:
            return 0
        n = len(self.eval_loader)
        limit = self.spec.config.eval_dataset.max_batches
        return min(n, limit) if limit else n

    # ---- data ---------------------------------------------------------------------------------

    def fetch_batch(self, which: tuple[str, int] | None = None) -> SequenceSample:
        """The next training batch, or (`which` = ("eval", i)) evaluation batch i: batch 0
        starts the eval dataset from its beginning. Eval sample ids are ("eval", id)."""
        assert self.loader is not None, "this worker does not serve the dataset"
        if which is None:
            batch = self.loader.next_batch()
        else:
            assert self.eval_loader is not None, "this run has no evaluation dataset"
            if which[1] == 0:
                self._eval_iter = iter(self.eval_loader.epoch_batches(0))
            batch = next(self._eval_iter)
            batch = dataclasses.replace(batch, ids=[("eval", i) for i in batch.ids])
        missing = set(self.spec.config.dataset_keys) - batch.keys
        if missing:
            raise ValueError(
                f"the dataset ({self.spec.config.dataset_type}) gave samples without keys "
                f"{sorted(missing)} that the graph reads from it (dataset_keys "
                f"{list(self.spec.config.dataset_keys)}); make the dataset write them"
            )
        self._put(batch)
        return batch.meta()

    def _put(self, sample: SequenceSample) -> None:
        """Keep each key of each sample; keys already held are kept as they are."""
        for one in sample.unpack():
            i = one.ids[0]
            held = self.store.setdefault(i, {})
            for key in one.keys - held.keys():
                held[key] = one.select([key])
            self.store_metadata.setdefault(i, {}).update(one.metadata)

    def local_data(self, ids: list[Any], keys: list[str]) -> SequenceSample:
        samples = []
        for i in ids:
            held = self.store.get(i, {})
            missing = [k for k in keys if k not in held]
            if missing:
                raise RuntimeError(
                    f"worker {self.index} holds no data for sample {i!r} keys {missing}"
                )
            samples.append(
                SequenceSample(
                    ids=[i],
                    seqlens={k: held[k].seqlens[k] for k in keys},
                    data={k: held[k].data[k] for k in keys},  # type: ignore[index]
                    trailing_shapes={k: held[k].trailing_shapes[k] for k in keys},
                    dtypes={k: held[k].dtypes[k] for k in keys},
                    metadata=self.store_metadata[i],
                )
            )
        return SequenceSample.gather(samples, keys)

    def free(self, frees: Frees) -> None:
        for ids, keys in frees:
            for i in ids:
                held = self.store.get(i)
                if held is None:
                    continue
                for key in keys:
                    held.pop(key, None)
                if not held:
                    del self.store[i]
                    del self.store_metadata[i]

    def send(self, payload: tuple[int, Transfer]) -> None:
        """Send the tensors of a Transfer to worker `dst` (which receives them in its MFC)."""
        from realflow.system.p2p import send_sample

        dst, transfer = payload
        data = self.local_data(transfer.meta.ids, sorted(transfer.meta.keys))
        send_sample(data, dst, self.spec.device)

    def store_size(self, _: Any = None) -> int:
        return sum(len(held) for held in self.store.values())

    def realloc(self, req: ReallocRequest) -> ReallocResult:
        assert self.mesh is not None, "realloc needs a mesh allocation"
        return self.mesh.realloc(req)

    # ---- weight copies ----------------------------------------------------------------------

    def get_weights(self, role: str) -> tuple[int, dict[str, torch.Tensor] | None]:
        """`(version, weights)` of `role`: a snapshot of its state dict (fp32 masters of a
        trained role) that later train steps do not change; None for a weightless role."""
        from realflow.engines.common import clone_state

        model = self.models[role]
        engine = model.module
        if engine is None:
            return model.version, None
        if hasattr(engine, "module_state_dict"):
            weights = engine.module_state_dict()
        else:
            weights = engine.module.state_dict()
        return model.version, clone_state(weights)

    def set_weights(self, payload: tuple[str, int, dict[str, torch.Tensor] | None]) -> None:
        """Load another worker's weights of the role this copy follows; the copy's parameter
        version becomes theirs."""
        role, version, weights = payload
        model = self.models[role]
        if weights is not None:
            model.module.module.load_state_dict(weights)
        model.version = version

    # ---- model function calls ---------------------------------------------------------------

    def call_uses_weights(self, mfc: str) -> bool:
        """Whether MFC `mfc` runs a model (its role has weights), once set up."""
        model = self.models.get(self.mfcs[mfc].model_name)
        return model is not None and model.module is not None

    def model_of(self, mfc: str) -> Model:
        """The model an MFC runs on here: its role's, or (mesh allocation) the copy on its mesh."""
        if self.mesh is not None:
            return self.mesh.model(mfc)
        return self.models[self.mfcs[mfc].model_name]

    def _move(self, req: MFCRequest) -> None:
        """Fetch the MFC's inputs held elsewhere, and (mesh MFCs) send peers what they need."""
        from realflow.system.p2p import send_sample

        for transfer in req.transfers:
            assert self.fetch_remote is not None
            self._put(self.fetch_remote(transfer))
        for dst, transfer in req.moves:
            if dst == self.index:
                assert self.fetch_remote is not None
                self._put(self.fetch_remote(transfer))
            else:
                meta = transfer.meta
                data = self.local_data(meta.ids, sorted(meta.keys))
                send_sample(data, dst, self.spec.device)

    def run_mfc(self, req: MFCRequest) -> MFCResult:
        start = time.time()
        mfc = self.mfcs[req.mfc]
        self._move(req)
        data = self.local_data(req.ids, list(mfc.input_keys)).remap_keys(mfc.input_key_remap)
        model = self.model_of(mfc.name)
        version = model.version
        interface = self.interfaces[mfc.name]
        device = getattr(model.module, "device", None) or "cpu"
        model.rng = torch.Generator(device=device)
        seed_name = mfc.name if req.round == 1 else f"{mfc.name}#round{req.round}"
        model.rng.manual_seed(call_seed(self.spec.config.seed, req.step, seed_name))
        offload = mfc.model_name in self.offloaded
        reset_peak_memory(device)
        if offload:
            model.module.onload()
        try:
            stats, meta = self._call(mfc, model, interface, data)
        finally:
            if offload:
                model.module.offload()
        stats = {**stats, **peak_memory_stats(device)}
        if req.release_after:
            assert self.mesh is not None
            self.mesh.release(mfc.name)
        end = time.time()
        return MFCResult(
            mfc.name,
            req.step,
            self.index,
            meta,
            dict(stats),
            start,
            end,
            self.store_size(),
            version,
        )

    def _call(
        self, mfc: MFCDef, model: Model, interface: ModelInterface, data: SequenceSample
    ) -> tuple[dict[str, float], SequenceSample | None]:
        """Run the interface; store generate/inference outputs. Returns (stats, output meta)."""
        if mfc.interface_type == InterfaceType.TRAIN_STEP:
            stats = interface.train_step(model, data, mfc.mb_spec)
            model.version += 1
            return stats, None
        if mfc.interface_type == InterfaceType.EVALUATE:
            return interface.evaluate(model, data, mfc.mb_spec), None
        call = (
            interface.generate
            if mfc.interface_type == InterfaceType.GENERATE
            else interface.inference
        )
        out = call(model, data, mfc.mb_spec)
        if out is None:
            return {}, None
        out = out.remap_keys(mfc.output_key_remap)
        missing = set(mfc.output_keys) - out.keys
        if missing:
            raise RuntimeError(
                f"interface '{mfc.interface_impl.type_}' of MFC '{mfc.name}' did not return "
                f"keys {sorted(missing)} (returned {sorted(out.keys)})"
            )
        out = out.select(mfc.output_keys)
        if self.mesh is not None and not self.mesh.keeps_outputs(mfc.name):
            return {}, None  # a tp / pp peer: its dp rank's outputs are read elsewhere
        self._put(out)
        return self._metrics(mfc, model, data, out), out.meta()

    def _metrics(
        self, mfc: MFCDef, model: Model, inputs: SequenceSample, out: SequenceSample
    ) -> dict[str, float]:
        """The configured metric functions on a call's inputs and outputs together."""
        if not self.metric_fns:
            return {}
        data = inputs.select([k for k in inputs.keys if k not in out.keys])
        if out.ids == data.ids:  # a sampling loop's filter returns the samples that passed only
            data.update_(out)
        stats: dict[str, float] = {}
        for name, fn in self.metric_fns:
            try:
                stats.update(fn(mfc, data, model))
            except Exception as e:
                raise RuntimeError(f"metric '{name}' failed on MFC '{mfc.name}': {e}") from e
        return stats

    # ---- checkpoints ----------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Write the HF directory of each trained role here, and this worker's state file."""
        for role in self.spec.trained_roles:
            if self.mesh is not None and not self.mesh.saves(role):
                continue  # another dp rank of the training mesh writes it
            if role in self.models:
                train_mfc = next(m for m in self.spec.mfcs if m.model_name == role and m.is_train)
                self.interfaces[train_mfc.name].save(
                    self.models[role], os.path.join(directory, role)
                )
        state = {
            "engines": {
                r: self.models[r].module.state_dict()
                for r in self.spec.trained_roles
                if r in self.models and self.models[r].module is not None
            },
            "versions": (
                self.mesh.versions()
                if self.mesh is not None
                else {r: m.version for r, m in self.models.items()}
            ),
            "interfaces": {n: i.state_dict() for n, i in self.interfaces.items()},
            "loader": self.loader.state_dict() if self.loader is not None else None,
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, os.path.join(directory, f"worker_{self.index}.pt"))

    def load(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, f"worker_{self.index}.pt"), weights_only=False)
        for role, engine_state in state["engines"].items():
            self.models[role].module.load_state_dict(engine_state)
        if self.mesh is not None:
            self.mesh.load_versions(state["versions"])
        else:
            for role, version in state["versions"].items():
                self.models[role].version = version
        for name, s in state["interfaces"].items():
            self.interfaces[name].load_state_dict(s)
        if self.loader is not None and state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
