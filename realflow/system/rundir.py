"""The run directory: one run at a time, never mixed with another run's files.

`open_run_dir(cfg, experiment)` is called before anything else of a run happens:

- the default `output_dir` is `runs/<experiment>/<date-time>-<pid>`, created exclusively, so two
  runs started in the same second never share it;
- the directory is locked for the run (`.lock`, an `flock` that the kernel drops when the
  process dies, so a killed run never leaves a stale lock); a second run on it is refused with
  the holder's pid, host, start time and command;
- a directory that already holds a run is refused unless `recover_mode` resumes it or
  `overwrite=true` clears its run files first;
- temporary directories a killed save left behind are removed, and a checkpoint that a killed
  replace moved aside is put back.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from typing import Any

from realflow.system.checkpoint import checkpoints_dir, recover_checkpoints

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# A directory holding either of these holds a run (at least one step ran). The other files a
# run writes (config, graph, trace, events) are replaced by the next run or cleared with it.
RUN_FILES = ("metrics.jsonl", "checkpoints")
RUN_FILES_ALSO_CLEARED = (
    "tensorboard", "trace.json", "config.yaml", "dfg.json", "dfg.dot", "dfg.svg", "trace.json.tmp",
)  # fmt: skip


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says why and what to do."""


@dataclasses.dataclass
class RunDir:
    """An open, locked run directory. `close()` releases the lock."""

    path: str
    lock_fd: int
    resumable: bool  # a checkpoint exists (recover_mode decides whether to use it)

    def close(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = -1


def default_output_dir(experiment: str, root: str = "runs") -> str:
    """A fresh `root/<experiment>/<date-time>-<pid>[-k]`, created now (exclusively)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(root, experiment, f"{stamp}-{os.getpid()}")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    for k in range(1000):
        path = base if k == 0 else f"{base}-{k}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"could not create a fresh run directory under {os.path.dirname(base)}")


def open_run_dir(output_dir: str, recover_mode: str, overwrite: bool) -> RunDir:
    """Create (if needed), check and lock `output_dir` for one run. See the module docstring."""
    _make_dir(output_dir)
    fd = _lock(output_dir)
    try:
        recover_checkpoints(output_dir)
        held = held_run_files(output_dir)
        has_ckpt = os.path.isdir(checkpoints_dir(output_dir)) and bool(
            os.listdir(checkpoints_dir(output_dir))
        )
        if held and overwrite:
            clear_run_files(output_dir)
            held, has_ckpt = [], False
        elif held and recover_mode == "disabled":
            raise RunDirError(
                f"output_dir {output_dir} already holds a run ({', '.join(held)}). Resume it with "
                "recover_mode=auto, start over in it with overwrite=true (deletes its metrics and "
                "checkpoints), or choose another output_dir."
            )
        return RunDir(output_dir, fd, has_ckpt)
    except BaseException:
        os.close(fd)
        raise


def held_run_files(output_dir: str) -> list[str]:
    """The run files present in `output_dir` (empty for a fresh directory)."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]


def clear_run_files(output_dir: str) -> None:
    """Delete a previous run's files (overwrite=true); other files are left alone."""
    for name in RUN_FILES + RUN_FILES_ALSO_CLEARED:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    logger.info("overwrite=true: cleared the previous run's files in %s", output_dir)


def _make_dir(output_dir: str) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunDirError(
            f"output_dir {output_dir} exists and is not a directory; give a directory path"
        )
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"cannot create output_dir {output_dir}: {e.strerror}; choose a writable location"
        ) from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise RunDirError(
            f"output_dir {output_dir} is not writable by this user; choose a writable location"
        )


def _lock(output_dir: str) -> int:
    path = os.path.join(output_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(
            f"output_dir {output_dir} is not writable ({e.strerror} creating {path}); choose a "
            "writable location"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_holder(fd)
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise RunDirError(f"cannot lock {path}: {e.strerror}") from None
        raise RunDirError(
            f"output_dir {output_dir} is in use by another run ({holder}); wait for it to end, "
            "stop it, or choose another output_dir"
        ) from None
    os.ftruncate(fd, 0)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    os.write(fd, json.dumps(info).encode())
    return fd


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info: dict[str, Any] = json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        return "holder unknown"
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
        f"{info.get('started', '?')}: {info.get('command', '?')}"
    )
