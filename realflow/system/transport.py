"""How the master reaches its workers: one interface, one implementation per mode.

A transport starts the workers, submits `(Kind, payload)` requests to one worker (each worker
runs its requests one at a time, in submission order), waits for any of the outstanding calls,
and moves sample tensors worker-to-worker when an MFC needs keys held elsewhere. A new mode
(or parameter reallocation, which moves weights the same way) implements this class.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import dataclasses
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from realflow.api.data import SequenceSample
from realflow.api.tracebacks import format_exception
from realflow.system.interrupt import THREAD_PREFIX
from realflow.system.worker import Frees, Kind, ModelWorker, Transfer, WorkerSpec

logger = logging.getLogger(__name__)


class WorkerFailure(RuntimeError):
    """A worker call that raised, or a worker process that died."""

    def __init__(
        self,
        worker: int,
        message: str,
        cause: BaseException | None = None,
        traceback_text: str = "",
    ):
        self.worker = worker
        self.cause = cause
        self.traceback_text = traceback_text
        super().__init__(message)


class Transport(abc.ABC):
    """The master's view of its workers."""

    n_workers: int
    devices: list[str]  # each worker's device, set by start() (realflow/system/devices.py)

    @abc.abstractmethod
    def start(self, specs: list[WorkerSpec]) -> None:
        """Create the workers (not yet set up: the master sends Kind.SETUP)."""

    @abc.abstractmethod
    def submit(self, worker: int, kind: Kind, payload: Any = None, frees: Frees = ()) -> Any:
        """Queue a request on `worker` (with released data to drop first); returns a handle."""

    @abc.abstractmethod
    def wait(self, handles: list[Any], timeout: float | None) -> list[Any]:
        """The handles among `handles` that are done (at least one unless `timeout` passes)."""

    @abc.abstractmethod
    def result(self, handle: Any) -> Any:
        """The value of a finished call; raises WorkerFailure when the call failed."""

    def before_mfc(self, dst: int, transfers: list[Transfer]) -> None:  # noqa: B027
        """Called right before an MFC that fetches `transfers` is submitted to `dst`. Transports
        whose data moves by explicit sends queue them here."""

    def call(
        self, worker: int, kind: Kind, payload: Any = None, timeout: float | None = None
    ) -> Any:
        """Submit and wait for one request."""
        handle = self.submit(worker, kind, payload)
        if not self.wait([handle], timeout):
            raise WorkerFailure(
                worker, f"worker {worker} did not answer {kind.value} within {timeout} s"
            )
        return self.result(handle)

    def call_all(self, workers: list[int], kind: Kind, payload: Any = None) -> list[Any]:
        handles = [self.submit(w, kind, payload) for w in workers]
        pending = list(handles)
        while pending:
            done = self.wait(pending, None)
            pending = [h for h in pending if h not in done]
        return [self.result(h) for h in handles]

    @abc.abstractmethod
    def shutdown(self, wait: bool = True) -> None:
        """Stop every worker; no process or thread is left running. `wait=False` (a second
        stop signal) does not wait for the calls still running to end."""


class LocalTransport(Transport):
    """Every worker in this process, each on its own thread: calls on different workers overlap
    (torch releases the GIL in its kernels); data moves by reference.

    Model computation (setup, checkpoints, and every call on a role with weights) runs on
    compute threads that the transport owns, so that the intra-op threads of all workers
    together never exceed `torch.get_num_threads()` (the cores, by default); see
    `ComputeThreads` for the two plans, chosen by `compute_plan`. Calls on weightless roles
    (rule-based rewards, the `toy` interfaces) run on their worker's own thread.
    """

    # How long shutdown waits for the calls still running on other workers to end.
    join_timeout_s = 30.0
    # "auto" | "serial" | "partition": see ComputeThreads.
    compute_plan = "auto"

    def start(self, specs: list[WorkerSpec]) -> None:
        specs = place_local(specs)  # a ConfigError (cuda without a GPU) before any worker
        self.n_workers = len(specs)
        self.devices = [s.device for s in specs]
        self.workers = [ModelWorker(spec, self._fetch) for spec in specs]
        self.queues: list[queue.Queue] = [queue.Queue() for _ in specs]
        self.stopping = threading.Event()
        self.compute = ComputeThreads(self.compute_plan, [_has_weights(s) for s in specs])
        self.threads = [
            # Daemon threads: a call that hangs past its timeout cannot keep the process alive.
            threading.Thread(
                target=_serve,
                args=(self.workers[i], q, self.stopping, self.compute.runner(i)),
                name=f"{THREAD_PREFIX}{i}",
                daemon=True,
            )
            for i, q in enumerate(self.queues)
        ]
        for t in self.threads:
            t.start()
        self._worker_of: dict[cf.Future, int] = {}

    def _fetch(self, transfer: Transfer) -> SequenceSample:
        meta = transfer.meta
        return self.workers[transfer.src].local_data(meta.ids, sorted(meta.keys))

    def submit(self, worker: int, kind: Kind, payload: Any = None, frees: Frees = ()) -> cf.Future:
        future: cf.Future = cf.Future()
        self.queues[worker].put((future, kind, payload, frees))
        self._worker_of[future] = worker
        return future

    def wait(self, handles: list[cf.Future], timeout: float | None) -> list[cf.Future]:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def result(self, handle: cf.Future) -> Any:
        worker = self._worker_of.pop(handle, -1)
        error = handle.exception()
        if error is not None:
            text = format_exception(error)
            raise WorkerFailure(worker, f"{type(error).__name__}: {error}", error, text)
        return handle.result()

    def shutdown(self, wait: bool = True) -> None:
        """Drop the queued requests, let the running ones end, and join every worker thread
        (a call that hangs past `join_timeout_s` is left to its daemon thread: see
        `worker_threads_alive`)."""
        if not hasattr(self, "queues"):
            return
        self.stopping.set()
        for q in self.queues:
            q.put(None)
        deadline = time.monotonic() + (self.join_timeout_s if wait else 0.0)
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.compute.shutdown(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads + self.compute.threads if t.is_alive()]
        if alive:
            logger.warning(
                "worker threads still in a call after %gs: %s", self.join_timeout_s, alive
            )


def place_local(specs: list[WorkerSpec]) -> list[WorkerSpec]:
    """The specs with each worker's device (see realflow/system/devices.py), all of them resolved
    from the run's `device` key at once."""
    from realflow.system.devices import local_gpu_count, local_worker_devices, resolve_device

    if not specs:
        return specs
    n_gpus = local_gpu_count()
    kind = resolve_device(specs[0].config.device, n_gpus)
    devices = local_worker_devices(kind, len(specs), n_gpus)
    return [dataclasses.replace(s, device=d) for s, d in zip(specs, devices, strict=True)]


# Setup imports transformers & co. lazily; their lazy-import machinery is not thread-safe.
_SETUP_LOCK = threading.Lock()


def _serve(
    worker: ModelWorker,
    requests: queue.Queue,
    stopping: threading.Event,
    compute: Callable[[Callable[[], Any]], Any],
) -> None:
    while True:
        item = requests.get()
        if item is None:
            return
        future, kind, payload, frees = item
        if stopping.is_set():
            future.cancel()
            continue
        if not future.set_running_or_notify_cancel():
            continue
        call = functools.partial(worker.handle, kind, payload, frees)
        try:
            if kind == Kind.SETUP:
                with _SETUP_LOCK:
                    future.set_result(compute(call))
                continue
            if kind in (Kind.SAVE, Kind.LOAD) or (
                kind == Kind.MFC and worker.call_uses_weights(payload.mfc)
            ):
                future.set_result(compute(call))
                continue
            future.set_result(call())
        except BaseException as e:  # handed to the master, which stops the run
            future.set_exception(e)


def _has_weights(spec: WorkerSpec) -> bool:
    roles = spec.config.roles()
    return any(roles[r].head != "none" for r in spec.roles)


class ComputeThreads:
    """Threads that run the model computation of local workers, with a torch intra-op thread
    count each, so that all of them together use at most `torch.get_num_threads()` threads.

    Why: each Python thread that calls into torch gets its own OpenMP team. With a team of all
    cores per worker thread, k busy workers run k x cores threads, and as soon as the teams of
    all threads outnumber the cores, libgomp stops spinning between parallel regions: every
    small op (a decode step has hundreds) then pays a futex wake-up. Plans:

    - `serial`: one compute thread with all the threads; model calls of different workers run
      one after another (they still overlap with weightless calls and with data movement).
      Measured the better plan on 2 cores (benchmarks/RESULTS.md, peer_trl), where a call
      running beside another gains nothing: it only halves the cores of both.
    - `partition`: a compute thread per worker with weights, each with threads // n of them
      (at least 1): calls of different workers overlap on disjoint shares of the cores.
    - `auto`: `partition` when every worker with weights gets at least 4 threads, else `serial`.
    - `none`: no compute threads, every call on its worker's thread (the behaviour before
      compute threads; kept to measure against).

    With its team alone on the cores, libgomp would spin ~300000 times at each barrier;
    importing realflow first sets GOMP_SPINCOUNT=1000 (see realflow/__init__.py), without
    which a loaded machine makes this thread's decode many times slower.
    """

    def __init__(self, plan: str, has_weights: list[bool]):
        import torch

        cores = torch.get_num_threads()
        n = max(1, sum(has_weights))
        if plan == "auto":
            plan = "partition" if cores // n >= 4 else "serial"
        if plan not in ("serial", "partition", "none"):
            raise ValueError(
                f"compute plan {plan!r} unknown; choose auto, serial, partition or none"
            )
        self.plan = plan
        self.threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []
        self._of_worker: list[int] = []
        if plan == "none":
            return
        if plan == "serial":
            self._start(cores)
            self._of_worker = [0] * len(has_weights)
        else:
            for w in has_weights:
                self._of_worker.append(len(self._queues))
                self._start(max(1, cores // n) if w else 1)
        logger.info("local compute plan %s: %s", plan, [t.name for t in self.threads])

    def _start(self, n_threads: int) -> None:
        q: queue.Queue = queue.Queue()
        t = threading.Thread(
            target=_compute_loop,
            args=(q, n_threads),
            name=f"{THREAD_PREFIX}-compute{len(self.threads)}-x{n_threads}",
            daemon=True,
        )
        self._queues.append(q)
        self.threads.append(t)
        t.start()

    def runner(self, worker: int) -> Callable[[Callable[[], Any]], Any]:
        """`run(fn)` for worker `worker`: fn() on its compute thread; returns or raises as fn."""
        if self.plan == "none":
            return lambda fn: fn()
        q = self._queues[self._of_worker[worker]]

        def run(fn: Callable[[], Any]) -> Any:
            future: cf.Future = cf.Future()
            q.put((fn, future))
            return future.result()

        return run

    def shutdown(self, timeout: float) -> None:
        for q in self._queues:
            q.put(None)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _compute_loop(jobs: queue.Queue, n_threads: int) -> None:
    import torch

    # A thread's first torch call sets its count from the last set_num_threads of any thread:
    # take that first, then set this thread's own.
    torch.get_num_threads()
    torch.set_num_threads(n_threads)
    while True:
        item = jobs.get()
        if item is None:
            return
        fn, future = item
        try:
            future.set_result(fn())
        except BaseException as e:
            future.set_exception(e)
