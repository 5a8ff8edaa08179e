"""Checkpoint faults: an exception, a full disk or a kill during a save leave the previous
checkpoint intact and resumable; replacing an existing step_N never loses it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from systest_utils import check_checkpoints_intact, checkpoint_dirs, metric_steps, toy_config

from realflow.system import checkpoint, runner
from realflow.system.checkpoint import CheckpointError, recover_checkpoints, write_checkpoint
from realflow.system.master import RunFailure
from realflow.system.toy_interfaces import ppo_like_nodes

pytestmark = pytest.mark.timeout(120)


def _resume_to(out: Path, total: int) -> list[int]:
    cfg = toy_config(out, ppo_like_nodes(), total_steps=total, recover_mode="auto")
    return [r["step"] for r in runner.run("toy", cfg).rows]


def test_exception_during_save_keeps_the_previous_checkpoint(tmp_path):
    nodes = ppo_like_nodes()
    nodes[5].fail_on_save = 2  # critic's part of the step_2 save raises
    cfg = toy_config(tmp_path, nodes, total_steps=4, save_freq_steps=1)
    with pytest.raises(RunFailure, match="toy failure on save 2"):
        runner.run("toy", cfg)
    check_checkpoints_intact(str(tmp_path), expect_latest=1)
    assert checkpoint_dirs(str(tmp_path)) == ["step_1"]
    assert _resume_to(tmp_path, 4) == [2, 3, 4]


def test_disk_full_during_save_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """torch.save onto a full disk (/dev/full: every write fails with ENOSPC)."""
    import torch

    from realflow.system import worker

    save = torch.save
    saves = []

    def save_to_full_disk(obj, path, *args, **kwargs):
        saves.append(path)
        target = "/dev/full" if len(saves) > 4 else path  # 4 workers save step_1 fine
        return save(obj, target, *args, **kwargs)

    monkeypatch.setattr(worker.torch, "save", save_to_full_disk)
    cfg = toy_config(tmp_path, ppo_like_nodes(), total_steps=3, save_freq_steps=1)
    assert runner.run_experiment("toy", cfg) == 1
    err = capsys.readouterr().err
    assert f"error: could not write checkpoint step_2 under {tmp_path}/checkpoints" in err, err
    assert "MiB free on that disk" in err and "Free disk space or make output_dir writable" in err
    assert f"the previous checkpoint {tmp_path}/checkpoints/step_1 is intact" in err
    check_checkpoints_intact(str(tmp_path), expect_latest=1)
    monkeypatch.undo()
    assert _resume_to(tmp_path, 3) == [2, 3]


@pytest.mark.slow
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    """kill -9 while step_2 is being written: step_1 survives, the partial directory is removed
    on the next start, and the run resumes from step_1."""
    out = tmp_path / "run"
    code = f"""
from realflow.system import runner
from realflow.system.toy_interfaces import ToyConfig, ppo_like_nodes
nodes = ppo_like_nodes()
nodes[4].save_sleep_s = 1.5  # actor's save: slow enough to be killed in
cfg = ToyConfig(nodes=nodes, output_dir={str(out)!r}, total_steps=6, save_freq_steps=1)
runner.run("toy", cfg)
"""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(repo))
    ckpts = out / "checkpoints"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        if "step_1" in names and any(n.startswith(".tmp_step_2") for n in names):
            break
        assert child.poll() is None, "the run ended before its second save"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert any(n.startswith(".tmp_step_2") for n in os.listdir(ckpts))
    check_checkpoints_intact_except_tmp(out, 1)
    assert _resume_to(out, 3) == [2, 3]
    check_checkpoints_intact(str(out), expect_latest=3)
    assert metric_steps(str(out)) == [1, 2, 3]


def check_checkpoints_intact_except_tmp(out: Path, latest: int) -> None:
    found = checkpoint.latest_checkpoint(str(out))
    assert found is not None and found[0] == latest
    assert (Path(found[1]) / "meta.json").is_file()


def _write(out: Path, step: int, content: str) -> str:
    def parts(d: str) -> None:
        Path(d, "weights.txt").write_text(content)

    return write_checkpoint(str(out), step, parts)


def test_replacing_a_checkpoint_is_atomic(tmp_path, monkeypatch):
    final = _write(tmp_path, 3, "old")
    _write(tmp_path, 3, "new")
    assert Path(final, "weights.txt").read_text() == "new"
    assert checkpoint_dirs(str(tmp_path)) == ["step_3"]  # nothing moved aside is left

    # A crash right after moving the old step_3 aside, before the new one is renamed in.
    rename = os.rename
    calls = []

    def crash_on_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        return rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, 3, "newer")
    monkeypatch.undo()
    assert not Path(final).exists()  # the moment of danger: only the moved-aside copy exists
    recover_checkpoints(str(tmp_path))
    assert Path(final, "weights.txt").read_text() == "new"
    assert checkpoint_dirs(str(tmp_path)) == ["step_3"]


def test_a_failed_write_leaves_no_partial_directory(tmp_path):
    _write(tmp_path, 1, "one")

    def fails(d: str) -> None:
        Path(d, "half").write_text("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="could not write checkpoint step_2"):
        write_checkpoint(str(tmp_path), 2, fails)
    assert checkpoint_dirs(str(tmp_path)) == ["step_1"]
