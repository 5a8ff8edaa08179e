"""mode=ray: each model worker is a Ray actor; the master stays in the driver.

The actors join one torch.distributed group (gloo on CPU; on GPU workers NCCL for CUDA tensors
and gloo for CPU ones) and move sample tensors to each other with point-to-point sends: the master queues a SEND on the holder and the MFC (which receives
first) on the consumer. Both are queued from the master's single thread, so every actor sees its
sends and receives in one global order and no pair can deadlock.

`ray_address` joins a running cluster; empty starts a local one (no dashboard unless asked) that
is stopped at the end. Each actor asks Ray for `ray_gpus_per_worker` GPUs (see
realflow/system/devices.py) and computes on the one Ray assigned it. On a cluster, submit the driver with the Ray Jobs API:
`ray job submit --address http://HEAD:8265 -- python -m realflow.quickstart ppo mode=ray ...`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from typing import Any

from realflow.api.config import ConfigError
from realflow.system.devices import process_group_backend, ray_gpus_per_worker, resolve_device
from realflow.system.transport import Transport, WorkerFailure
from realflow.system.worker import Frees, Kind, ModelWorker, Transfer, WorkerSpec

logger = logging.getLogger(__name__)


class _RayWorker:
    """The actor body: a ModelWorker plus its place in the torch.distributed group."""

    def __init__(self, spec: WorkerSpec):
        from realflow.system.p2p import recv_sample

        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        if spec.device == "cuda":
            # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned: that GPU is cuda:0 here.
            spec = dataclasses.replace(spec, device="cuda:0")
        self.worker = ModelWorker(spec, lambda t: recv_sample(t.meta, t.src, spec.device))
        self.device = spec.device

    def init_distributed(self, master_addr: str, port: int, rank: int, world: int) -> int:
        import torch.distributed as dist

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK="0",
        )
        from realflow.system.devices import process_group_backend

        if self.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(self.device)
        dist.init_process_group(
            process_group_backend(self.device),
            init_method=f"tcp://{master_addr}:{port}",
            rank=rank,
            world_size=world,
        )
        return os.getpid()

    def handle(self, kind: Kind, payload: Any = None, frees: Frees = ()) -> Any:
        try:
            return self.worker.handle(kind, payload, frees)
        except Exception as e:
            from realflow.api.tracebacks import format_exception

            # Travels with the pickled exception: the driver shows the user's frames from it.
            e.realflow_traceback = format_exception(e)  # type: ignore[attr-defined]
            raise


def place_ray(specs: list[WorkerSpec], cluster_gpus: int) -> tuple[list[WorkerSpec], float]:
    """The specs with their device ('cpu', or 'cuda': the GPU Ray assigns the actor) and the
    `num_gpus` each worker actor asks for; a ConfigError before any actor starts when the
    cluster cannot give what the config asks."""
    if not specs:
        return specs, 0.0
    cfg = specs[0].config
    kind = resolve_device(cfg.device, cluster_gpus, "the Ray cluster")
    num_gpus = ray_gpus_per_worker(kind, cfg.ray_gpus_per_worker)
    needed = num_gpus * len(specs)
    if needed > cluster_gpus:
        raise ConfigError(
            [
                f"ray_gpus_per_worker: {len(specs)} workers x {num_gpus} GPU(s) ({needed}) is "
                f"more than the Ray cluster's {cluster_gpus} GPU(s); use fewer workers "
                "(allocation), or a fraction (e.g. ray_gpus_per_worker=0.5) to share GPUs"
            ]
        )
    return [dataclasses.replace(s, device=kind) for s in specs], num_gpus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayTransport(Transport):
    sends_data = True  # the master queues explicit SENDs for transfers

    def __init__(self, address: str = "", dashboard: bool = False):
        self.address = address
        self.dashboard = dashboard
        self.started_cluster = False
        self.actors: list[Any] = []
        self._worker_of: dict[Any, int] = {}
        self.pids: list[int] = []

    def start(self, specs: list[WorkerSpec]) -> None:
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=True)
            else:
                ray.init(
                    num_cpus=max(2, os.cpu_count() or 1),
                    include_dashboard=self.dashboard,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=True,
                )
                self.started_cluster = True
        specs, num_gpus = place_ray(specs, int(ray.cluster_resources().get("GPU", 0)))
        self.n_workers = len(specs)
        self.devices = [s.device for s in specs]
        actor_cls = ray.remote(num_cpus=0, num_gpus=num_gpus, max_restarts=0)(_RayWorker)
        self.actors = [actor_cls.remote(spec) for spec in specs]
        # Workers on one node reach each other on loopback; across nodes use the first actor's node.
        addr = (
            "127.0.0.1"
            if not self.address
            else ray.get(
                self.actors[0].__ray_call__.remote(lambda self: ray.util.get_node_ip_address())
            )
        )
        port = _free_port()
        self.pids = ray.get(
            [
                a.init_distributed.remote(addr, port, i, self.n_workers)
                for i, a in enumerate(self.actors)
            ]
        )
        logger.info(
            "ray: %d worker actors (pids %s, %s GPU(s) each, device %s) in one %s group",
            self.n_workers,
            self.pids,
            num_gpus,
            specs[0].device if specs else "-",
            process_group_backend(specs[0].device if specs else "cpu"),
        )

    def submit(self, worker: int, kind: Kind, payload: Any = None, frees: Frees = ()) -> Any:
        ref = self.actors[worker].handle.remote(kind, payload, frees)
        self._worker_of[ref] = worker
        return ref

    def before_mfc(self, dst: int, transfers: list[Transfer]) -> None:
        """Sends are queued by the master (Kind.SEND on each source) right before the MFC."""

    def wait(self, handles: list[Any], timeout: float | None) -> list[Any]:
        import ray

        ready, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        if not ready:
            return []
        more, _ = ray.wait(handles, num_returns=len(handles), timeout=0)
        return list({*ready, *more})

    def result(self, handle: Any) -> Any:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        worker = self._worker_of.pop(handle, -1)
        try:
            return ray.get(handle)
        except RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else e
            text = getattr(cause, "realflow_traceback", "") or str(e)
            raise WorkerFailure(worker, f"{type(cause).__name__}: {cause}", cause, text) from None
        except RayActorError as e:
            pid = self.pids[worker] if 0 <= worker < len(self.pids) else "?"
            raise WorkerFailure(worker, f"worker process (pid {pid}) died: {e}", e) from None

    def shutdown(self, wait: bool = True) -> None:
        import ray

        if not ray.is_initialized():
            return
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # already dead
                logger.debug("ray.kill: %s", e)
        self.actors = []
        if self.started_cluster:
            ray.shutdown()
