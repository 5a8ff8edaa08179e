"""How the master reaches its workers: one interface, one implementation per mode.

A transport starts the workers, submits `(Kind, payload)` requests to one worker (each worker
runs its requests one at a time, in submission order), waits for any of the outstanding calls,
and moves sample tensors worker-to-worker when an MFC needs keys held elsewhere. A new mode
(or parameter reallocation, which moves weights the same way) implements this class.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import logging
import queue
import threading
import time
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
    (torch releases the GIL in its kernels); data moves by reference."""

    # How long shutdown waits for the calls still running on other workers to end.
    join_timeout_s = 30.0

    def start(self, specs: list[WorkerSpec]) -> None:
        self.n_workers = len(specs)
        self.workers = [ModelWorker(spec, self._fetch) for spec in specs]
        self.queues: list[queue.Queue] = [queue.Queue() for _ in specs]
        self.stopping = threading.Event()
        self.threads = [
            # Daemon threads: a call that hangs past its timeout cannot keep the process alive.
            threading.Thread(
                target=_serve,
                args=(self.workers[i], q, self.stopping),
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
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            logger.warning(
                "worker threads still in a call after %gs: %s", self.join_timeout_s, alive
            )


# Setup imports transformers & co. lazily; their lazy-import machinery is not thread-safe.
_SETUP_LOCK = threading.Lock()


def _serve(worker: ModelWorker, requests: queue.Queue, stopping: threading.Event) -> None:
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
        try:
            if kind == Kind.SETUP:
                with _SETUP_LOCK:
                    future.set_result(worker.handle(kind, payload, frees))
                continue
            future.set_result(worker.handle(kind, payload, frees))
        except BaseException as e:  # handed to the master, which stops the run
            future.set_exception(e)
