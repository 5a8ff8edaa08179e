"""Checkpoint directories: `output_dir/checkpoints/step_<N>/` holds an HF directory per trained
role, a state file per worker (optimizer, LR schedule, interface state, loader position, RNG) and
`meta.json`. Each is written under a temporary name and renamed into place when complete, so a
crash mid-save leaves the last good checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def latest_checkpoint(output_dir: str) -> tuple[int, str] | None:
    """(step, path) of the newest complete checkpoint, or None."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return None
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "meta.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return max(found) if found else None


def write_checkpoint(output_dir: str, step: int, write_parts: Callable[[str], None]) -> str:
    """Write step `step` with `write_parts(tmp_dir)`, then rename it into place atomically."""
    root = checkpoints_dir(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp_step_{step}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write_parts(tmp)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "time": time.time()}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
