"""The user's own frames of a traceback: where in *their* file (a reward function, a plugin,
an interface) an error happened, without realflow's, the standard library's or third-party
packages' frames around it."""

from __future__ import annotations

import os
import re
import sysconfig
import traceback

_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>.+)$')
_REALFLOW = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SYSTEM = tuple(
    os.path.abspath(p)
    for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)


def format_exception(error: BaseException) -> str:
    """The full traceback text of `error` (with its chained causes)."""
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def is_user_file(path: str) -> bool:
    """Whether `path` is outside realflow, the standard library and installed packages."""
    if path.startswith("<"):
        return False
    path = os.path.abspath(path)
    if path.startswith(_REALFLOW + os.sep) or path.startswith(_SYSTEM):
        return False
    return "site-packages" not in path and "dist-packages" not in path


def user_frames(traceback_text: str) -> list[str]:
    """`File "...", line N, in fn` lines (each with its source line) of the user's frames, in
    call order; empty when every frame is realflow's or a library's."""
    lines = traceback_text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = _FRAME.match(line)
        if m is None or not is_user_file(m.group("file")):
            continue
        out.append(line.rstrip())
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if nxt.strip() and not _FRAME.match(nxt) and nxt.startswith("    "):
            out.append(nxt.rstrip())
    return out
