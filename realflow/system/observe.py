"""What a run leaves to look at: metrics.jsonl, tensorboard events, trace.json, progress (a bar
on a terminal, log lines otherwise) and a summary table."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from realflow.system.mesh import ReallocResult
from realflow.system.worker import MFCResult

logger = logging.getLogger(__name__)

# Keys shown in the progress bar and the summary when a row has them.
KEY_METRICS = ("reward/mean", "loss", "acc", "reward_acc", "kl")
# When stderr is not a terminal, a progress log line at most this often (in seconds).
PROGRESS_LOG_EVERY_S = 30.0


def flatten_step(
    step: int, stats: dict[str, dict[str, float]], step_s: float, order: list[str]
) -> dict[str, Any]:
    """One metrics row: `{mfc}/{stat}` for every MFC, and the first train MFC's stats unprefixed.

    `time/step_s` is the step period: the wall time between the end of the previous step and
    the end of this one (see `Master.run`); each call's own time is in trace.json."""
    row: dict[str, Any] = {"step": step, "time/step_s": round(step_s, 6)}
    for name in order:
        for key, value in stats.get(name, {}).items():
            row[f"{name}/{key}"] = value
    for name in order:
        if name in stats and stats[name]:
            for key, value in stats[name].items():
                row.setdefault(key, value)
            break
    return row


def drop_rows_after(output_dir: str, step: int) -> None:
    """Remove the rows of steps after `step` from metrics.jsonl: a resumed run rewrites them."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


class MetricsWriter:
    """Writes each step's row to metrics.jsonl (and tensorboard) and shows progress.

    Progress goes to `stream` (stderr by default): a tqdm bar when it is a terminal; otherwise
    (a log file, a pipe, a cluster job's output) no bar, but an INFO log line with the key
    metrics at the first step, at most every `PROGRESS_LOG_EVERY_S` seconds, and at the last.
    """

    def __init__(
        self,
        output_dir: str,
        total_steps: int,
        tensorboard: bool,
        progress_bar: bool,
        train_order: list[str],
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.train_order = train_order
        self.first_step: int | None = None  # the first step this writer wrote
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        stream = sys.stderr if stream is None else stream
        self.bar = None
        self.log_progress = progress_bar and not _is_terminal(stream)
        if progress_bar and not self.log_progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, desc="steps", dynamic_ncols=True, leave=True, file=stream
            )
        self.total_steps = total_steps
        self.clock = clock
        self.n_written = 0
        self.last_line_t: float | None = None

    def write(
        self,
        step: int,
        stats: dict[str, dict[str, float]],
        step_s: float,
        order: list[str],
        extra: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Write the row of `step` (`extra`: more keys, e.g. the eval/... stats)."""
        # Train MFCs first, so unprefixed keys come from the trained model's step.
        ordered = [n for n in self.train_order if n in stats] + [
            n for n in order if n not in self.train_order
        ]
        row = flatten_step(step, stats, step_s, ordered)
        row.update(extra or {})
        if self.first_step is None:
            self.first_step = step
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
        self.n_written += 1
        shown = {k: f"{row[k]:.4g}" for k in KEY_METRICS if isinstance(row.get(k), (int, float))}
        shown["step_s"] = f"{step_s:.3g}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif self.log_progress:
            self._progress_line(shown)
        return row

    def _progress_line(self, shown: dict[str, str]) -> None:
        now, last = self.clock(), self.last_line_t
        final = self.n_written >= self.total_steps
        if last is not None and now - last < PROGRESS_LOG_EVERY_S and not final:
            return
        self.last_line_t = now
        metrics = " ".join(f"{k}={v}" for k, v in shown.items())
        logger.info("steps %d/%d: %s", self.n_written, self.total_steps, metrics)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()

    def read_rows(self) -> list[dict[str, Any]]:
        """The rows this writer wrote, read back from metrics.jsonl (rows are not kept in
        memory: a long run would grow by a few KB per step)."""
        if self.first_step is None or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r for r in rows if r["step"] >= self.first_step]

    def summary(self, rows: list[dict[str, Any]] | None = None) -> str:
        """A table of the key metrics: mean of the first and last 10% of steps."""
        rows = self.read_rows() if rows is None else rows
        if not rows:
            return "no steps ran"
        keys = ["time/step_s", *[k for k in KEY_METRICS if any(k in r for r in rows)]]
        n = max(1, len(rows) // 10)
        lines = [f"{'metric':<16}{'first 10%':>14}{'last 10%':>14}", "-" * 44]
        for k in keys:
            first = [r[k] for r in rows[:n] if k in r]
            last = [r[k] for r in rows[-n:] if k in r]
            if first and last:
                lines.append(
                    f"{k:<16}{sum(first) / len(first):>14.4f}{sum(last) / len(last):>14.4f}"
                )
        return "\n".join(lines)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Tracer:
    """Chrome trace (opens in Perfetto): a track per worker, one complete event per MFC call
    with args `step`, `n_seqs`, `store` (entries the worker holds after the call) and `version`
    (the parameter version of the model it read: train steps taken before it), and a track for
    the master's checkpoint saves.

    Events are streamed to the file as they come (a long run must not hold them all in
    memory); `write()` closes the JSON object. A process killed mid-run leaves the object open.
    """

    def __init__(self, path: str, worker_names: dict[int, str]):
        self.path = path
        self.t0 = time.time()
        self.master_tid = max(worker_names, default=-1) + 1  # the master's own track
        names = {**worker_names, self.master_tid: "master (checkpoints)"}
        self.file: TextIO | None = open(path, "w")  # noqa: SIM115 (closed by write())
        self.file.write('{"displayTimeUnit": "ms", "traceEvents": [\n')
        self.n_events = 0
        for w, name in sorted(names.items()):
            self._emit(
                {"name": "thread_name", "ph": "M", "pid": 0, "tid": w, "args": {"name": name}}
            )

    def _emit(self, event: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write((",\n" if self.n_events else "") + json.dumps(event))
        self.n_events += 1

    def record_save(self, step: int, start: float, end: float) -> None:
        """A checkpoint of `step` written from `start` to `end` (on the master's track)."""
        self._emit(
            {
                "name": f"save step_{step}",
                "ph": "X",
                "pid": 0,
                "tid": self.master_tid,
                "ts": (start - self.t0) * 1e6,
                "dur": (end - start) * 1e6,
                "args": {"step": step},
            }
        )
        self.flush()

    def record(self, result: MFCResult, n_seqs: int) -> None:
        args = {
            "step": result.step,
            "n_seqs": n_seqs,
            "store": result.store_size,
            "version": result.version,
        }
        self._span(result.mfc, result.worker, result.start, result.end, args)

    def _span(self, name: str, worker: int, start: float, end: float, args: dict) -> None:
        """A complete event on `worker`'s track from `start` to `end` (wall-clock seconds)."""
        self._emit(
            {
                "name": name,
                "ph": "X",
                "pid": 0,
                "tid": worker,
                "ts": (start - self.t0) * 1e6,
                "dur": (end - start) * 1e6,
                "args": args,
            }
        )

    def record_realloc(self, result: ReallocResult) -> None:
        """One worker's part of a realloc (named `realloc <role> <src> -> <dst>`) on its track;
        args: the step it ran before, the parameter version it moved, and bytes moved."""
        req = result.request
        args = {
            "step": req.step,
            "moved_version": req.version,
            "sent_bytes": result.sent_bytes,
            "recv_bytes": result.recv_bytes,
            "local_bytes": result.local_bytes,
        }
        self._span(req.name, result.worker, result.start, result.end, args)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def write(self) -> None:
        """Close the trace (a complete JSON object from now on)."""
        if self.file is None:
            return
        self.file.write("\n]}\n")
        self.file.close()
        self.file = None
