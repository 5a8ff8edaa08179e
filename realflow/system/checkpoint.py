"""Checkpoint directories: `output_dir/checkpoints/step_<N>/` holds an HF directory per trained
role, a state file per worker (optimizer, LR schedule, interface state, loader position, RNG) and
`meta.json`. A checkpoint is complete when it has `meta.json`.

Each is written under a temporary name and renamed into place when complete, so a crash mid-save
leaves the last good checkpoint. Replacing an existing `step_<N>` moves the old one aside first
(`.old_step_<N>_<pid>`) and deletes it only after the new one is in place; `recover_checkpoints`
(run at the start of every run) puts a moved-aside checkpoint back if the replace was killed, and
removes the temporary directories of killed saves.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
OLD_DIR = re.compile(r"^\.old_step_(\d+)_\d+$")
TMP_PREFIX = ".tmp_step_"
# How a full disk shows up: OSError(ENOSPC) from Python, a RuntimeError from torch.save's writer.
_DISK_FULL_HINTS = ("No space left on device", "file write failed", "inline_container")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact (the message names it)."""


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "meta.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> tuple[int, str] | None:
    """(step, path) of the newest complete checkpoint, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def write_checkpoint(
    output_dir: str, step: int, write_parts: Callable[[str], None], keep_last_n: int = 0
) -> str:
    """Write step `step` with `write_parts(tmp_dir)`, then rename it into place atomically.

    `keep_last_n` > 0 deletes the oldest complete checkpoints beyond the newest n afterwards.
    A failure removes the partial directory and raises (CheckpointError when the disk is full or
    not writable); existing checkpoints are untouched.
    """
    root = checkpoints_dir(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f"{TMP_PREFIX}{step}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write_parts(tmp)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "time": time.time()}, f)
        _rename_into_place(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _is_disk_problem(e):
            raise CheckpointError(_disk_message(output_dir, step, e)) from e
        raise
    if keep_last_n > 0:
        prune_checkpoints(output_dir, keep_last_n)
    return final


def _rename_into_place(tmp: str, final: str) -> None:
    if not os.path.exists(final):
        os.rename(tmp, final)
        return
    step = os.path.basename(final).removeprefix("step_")
    old = os.path.join(os.path.dirname(final), f".old_step_{step}_{os.getpid()}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(output_dir: str, keep_last_n: int) -> None:
    """Delete every complete checkpoint but the newest `keep_last_n`."""
    for step, path in complete_checkpoints(output_dir)[:-keep_last_n]:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed checkpoint step_%d (keep_last_n_checkpoints=%d)", step, keep_last_n)


def recover_checkpoints(output_dir: str) -> None:
    """Undo what a killed save left: delete `.tmp_step_*`, put back a moved-aside `step_N`
    whose replacement never arrived (and delete it when the replacement is complete)."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by an interrupted save", path)
            continue
        m = OLD_DIR.match(name)
        if m is None:
            continue
        final = os.path.join(root, f"step_{m.group(1)}")
        if os.path.isfile(os.path.join(final, "meta.json")):
            shutil.rmtree(path, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(path, final)
            logger.info("restored %s, moved aside by an interrupted save", final)


def _is_disk_problem(e: BaseException) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (
            errno.ENOSPC,
            errno.EDQUOT,
            errno.EROFS,
            errno.EACCES,
        ):
            return True
        if any(h in str(e) for h in _DISK_FULL_HINTS):
            return True
        e = e.__cause__ or e.__context__ or getattr(e, "cause", None)
        seen += 1
    return False


def _disk_message(output_dir: str, step: int, e: BaseException) -> str:
    latest = latest_checkpoint(output_dir)
    kept = (
        f"the previous checkpoint {latest[1]} is intact"
        if latest
        else "no earlier checkpoint exists"
    )
    try:
        free = shutil.disk_usage(checkpoints_dir(output_dir)).free / 2**20
        space = f"{free:.0f} MiB free on that disk"
    except OSError:
        space = "free space unknown"
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return (
        f"could not write checkpoint step_{step} under {checkpoints_dir(output_dir)} ({space}): "
        f"{reason}. Free disk space or make output_dir writable, then resume with "
        f"recover_mode=auto; {kept}."
    )
