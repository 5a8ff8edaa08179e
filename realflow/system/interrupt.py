"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (what schedulers send before a kill).

The first signal asks the run to stop: the master fetches no new step, the steps in flight
finish, a checkpoint of the last step is written (unless `save_on_interrupt=false`), and the
CLI exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM) after one line saying
where it saved and how to resume. A second signal raises `Interrupted` at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
THREAD_PREFIX = "realflow-worker"  # names of mode=local worker threads


def worker_threads_alive() -> list[str]:
    """Names of local worker threads still running (a hung or abandoned call): the CLI then
    ends the process with os._exit, since interpreter teardown while a thread is inside torch
    aborts (SIGABRT)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


class Interrupted(BaseException):
    """A second stop signal: leave now (BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received twice: exiting at once")


class StopRequest:
    """A stop flag the master polls. `request(signum)` sets it (tests call it directly);
    `with stop.on_signals():` makes SIGINT/SIGTERM set it (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def request(self, signum: int = signal.SIGINT) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        logger.warning(
            "%s received: finishing the steps in flight, then saving a checkpoint; "
            "send it again to exit at once",
            signal.Signals(signum).name,
        )

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.request(signum)

    def on_signals(self) -> _Handlers:
        return _Handlers(self)


class _Handlers:
    def __init__(self, stop: StopRequest):
        self.stop = stop
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.previous[s] = signal.signal(s, self.stop._handle)
        return self.stop

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
