"""The run directory: locked per run, unique by default, never mixed with an earlier run's
files, cleaned of what a killed save left, with a bounded number of checkpoints."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from systest_utils import checkpoint_dirs, metric_steps, toy_config

from realflow.system import runner
from realflow.system.rundir import RunDirError, default_output_dir, open_run_dir
from realflow.system.toy_interfaces import ppo_like_nodes

pytestmark = pytest.mark.timeout(120)


def test_a_second_run_on_a_locked_output_dir_is_refused(tmp_path):
    """A run in progress holds the lock: another run on the same directory is refused with
    the holder's pid; once the first ends the directory can be resumed."""
    out = tmp_path / "run"
    cfg = toy_config(out, ppo_like_nodes(0.05), total_steps=8)
    first = threading.Thread(target=runner.run, args=("toy", cfg))
    first.start()
    try:
        for _ in range(200):
            if (out / ".lock").exists() and (out / "config.yaml").exists():
                break
            time.sleep(0.02)
        with pytest.raises(RunDirError, match=rf"in use by another run \(pid {os.getpid()} "):
            runner.run("toy", toy_config(out, ppo_like_nodes(), total_steps=2))
    finally:
        first.join()
    assert metric_steps(str(out)) == list(range(1, 9))  # the refused run wrote nothing


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """The lock is an flock: the kernel drops it when the holding process dies (kill -9)."""
    out = tmp_path / "run"
    code = (
        "import sys, time; from realflow.system.rundir import open_run_dir; "
        f"open_run_dir({str(out)!r}, 'disabled', False); print('locked', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"pid {child.pid} "):
            open_run_dir(str(out), "disabled", False)
    finally:
        child.kill()
        child.wait()
    open_run_dir(str(out), "disabled", False).close()


def test_default_output_dirs_are_unique_within_a_second(tmp_path):
    made = [default_output_dir("ppo", root=str(tmp_path)) for _ in range(5)]
    assert len(set(made)) == 5
    assert all(os.path.isdir(d) and f"-{os.getpid()}" in d for d in made)


def test_rerun_into_a_used_dir_needs_recover_mode_or_overwrite(tmp_path):
    out = tmp_path / "run"
    runner.run("toy", toy_config(out, ppo_like_nodes(), total_steps=3))
    with pytest.raises(
        RunDirError, match="already holds a run .*recover_mode=auto.*overwrite=true"
    ):
        runner.run("toy", toy_config(out, ppo_like_nodes(), total_steps=2))
    assert metric_steps(str(out)) == [1, 2, 3]  # untouched
    (out / "notes.txt").write_text("mine")
    again = runner.run("toy", toy_config(out, ppo_like_nodes(), total_steps=2, overwrite=True))
    assert [r["step"] for r in again.rows] == [1, 2]
    assert metric_steps(str(out)) == [1, 2]
    assert checkpoint_dirs(str(out)) == ["step_2"]  # the old step_3 is gone
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: left alone


def test_output_dir_that_is_a_file_or_not_writable(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        runner.run("toy", toy_config(target, ppo_like_nodes(), total_steps=1))
    with pytest.raises(RunDirError, match="cannot create output_dir .*Not a directory"):
        runner.run("toy", toy_config(target / "sub", ppo_like_nodes(), total_steps=1))


def test_unwritable_output_dir_is_refused():
    """/sys refuses new files even to root: the run stops before anything starts."""
    with pytest.raises(RunDirError, match="cannot create output_dir /sys/realflow-run: Operation"):
        runner.run("toy", toy_config("/sys/realflow-run", ppo_like_nodes(), total_steps=1))
    with pytest.raises(RunDirError, match="output_dir /sys is not writable"):
        runner.run("toy", toy_config("/sys", ppo_like_nodes(), total_steps=1))


def test_recover_mode_resume_needs_a_checkpoint_and_auto_says_it_starts_fresh(tmp_path, caplog):
    with pytest.raises(RunDirError, match="recover_mode=resume: no complete checkpoint"):
        runner.run("toy", toy_config(tmp_path / "a", ppo_like_nodes(), recover_mode="resume"))
    with caplog.at_level(logging.WARNING):
        result = runner.run(
            "toy", toy_config(tmp_path / "b", ppo_like_nodes(), total_steps=2, recover_mode="auto")
        )
    assert [r["step"] for r in result.rows] == [1, 2]
    assert "recover_mode=auto: no checkpoint in" in caplog.text


def test_stale_temporaries_are_cleaned_and_moved_aside_checkpoints_restored(tmp_path):
    out = tmp_path / "run"
    runner.run("toy", toy_config(out, ppo_like_nodes(), total_steps=2, save_freq_steps=1))
    ckpts = out / "checkpoints"
    (ckpts / ".tmp_step_3_999").mkdir()  # a save killed mid-write
    (ckpts / ".tmp_step_3_999" / "worker_0.pt").write_bytes(b"partial")
    os.rename(ckpts / "step_2", ckpts / ".old_step_2_999")  # a replace killed between renames
    resumed = runner.run(
        "toy", toy_config(out, ppo_like_nodes(), total_steps=3, recover_mode="auto")
    )
    assert [r["step"] for r in resumed.rows] == [3]  # resumed from the restored step_2
    assert checkpoint_dirs(str(out)) == ["step_1", "step_2", "step_3"]


def test_keep_last_n_checkpoints(tmp_path):
    out = tmp_path / "run"
    cfg = toy_config(out, ppo_like_nodes(), total_steps=5, save_freq_steps=1)
    cfg.keep_last_n_checkpoints = 2
    runner.run("toy", cfg)
    assert checkpoint_dirs(str(out)) == ["step_4", "step_5"]
    meta = json.loads((out / "checkpoints" / "step_5" / "meta.json").read_text())
    assert meta["step"] == 5


def test_overwrite_with_recover_mode_is_a_config_error():
    from realflow.system.toy_interfaces import ToyConfig

    cfg = ToyConfig(nodes=ppo_like_nodes(), overwrite=True, recover_mode="auto")
    assert any("overwrite=true deletes the run" in p for p in cfg.validate())
