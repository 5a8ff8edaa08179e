"""mode=ray: each model worker is a Ray actor; the master stays in the driver.

The actors join one torch.distributed group (gloo on CPU) and move sample tensors to each other
with point-to-point sends: the master queues a SEND on the holder and the MFC (which receives
first) on the consumer. Both are queued from the master's single thread, so every actor sees its
sends and receives in one global order and no pair can deadlock.

`ray_address` joins a running cluster; empty starts a local one (no dashboard unless asked) that
is stopped at the end. On a cluster, submit the driver with the Ray Jobs API:
`ray job submit --address http://HEAD:8265 -- python -m realflow.quickstart ppo mode=ray ...`.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

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
        self.worker = ModelWorker(spec, lambda t: recv_sample(t.meta, t.src))

    def init_distributed(self, master_addr: str, port: int, rank: int, world: int) -> int:
        import torch.distributed as dist

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK="0",
        )
        dist.init_process_group(
            "gloo", init_method=f"tcp://{master_addr}:{port}", rank=rank, world_size=world
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
        self.n_workers = len(specs)
        actor_cls = ray.remote(num_cpus=0, max_restarts=0)(_RayWorker)
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
        logger.info("ray: %d worker actors (pids %s) in one gloo group", self.n_workers, self.pids)

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
