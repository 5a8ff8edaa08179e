"""SIGINT / SIGTERM: the run stops at a step boundary, saves, says how to resume and exits
130 / 143; a second signal exits at once; a stopped-and-resumed run equals an uninterrupted one.
Failures exit 1 with the user's own frames and no abort (mode=local)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from systest_utils import check_checkpoints_intact, metric_steps, toy_config, without_time

from realflow.system import observe, runner
from realflow.system.interrupt import StopRequest
from realflow.system.toy_interfaces import ppo_like_nodes

pytestmark = pytest.mark.timeout(240)


def _stop_after(monkeypatch, stop: StopRequest, step: int) -> None:
    """Request a stop right after metrics row `step` is written (as a signal would)."""
    write = observe.MetricsWriter.write

    def write_then_stop(self, s, *args, **kwargs):
        row = write(self, s, *args, **kwargs)
        if s == step:
            stop.request(signal.SIGTERM)
        return row

    monkeypatch.setattr(observe.MetricsWriter, "write", write_then_stop)


def test_stop_finishes_the_steps_in_flight_and_saves(tmp_path, monkeypatch):
    fresh = runner.run("toy", toy_config(tmp_path / "fresh", ppo_like_nodes(0.02), total_steps=8))
    out = tmp_path / "run"
    stop = StopRequest()
    _stop_after(monkeypatch, stop, 3)
    result = runner.run("toy", toy_config(out, ppo_like_nodes(0.02), total_steps=8), stop)
    assert result.interrupted and result.saved_at_stop
    # Two steps may be in flight when the stop arrives: both finish, none starts after.
    assert result.last_step in (3, 4)
    assert metric_steps(str(out)) == list(range(1, result.last_step + 1))
    check_checkpoints_intact(str(out), expect_latest=result.last_step)
    monkeypatch.undo()

    resumed = runner.run(
        "toy", toy_config(out, ppo_like_nodes(0.02), total_steps=8, recover_mode="auto")
    )
    assert [without_time(r) for r in resumed.rows] == [
        without_time(r) for r in fresh.rows[result.last_step :]
    ]
    assert metric_steps(str(out)) == list(range(1, 9))


def test_stop_without_save_on_interrupt(tmp_path, monkeypatch):
    stop = StopRequest()
    _stop_after(monkeypatch, stop, 2)
    cfg = toy_config(tmp_path, ppo_like_nodes(), total_steps=8, save_on_interrupt=False)
    result = runner.run("toy", cfg, stop)
    assert result.interrupted and not result.saved_at_stop
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_sft_stopped_and_resumed_gives_identical_weights(tmp_path, monkeypatch):
    from test_resume import _sft_config, _weights

    fresh = runner.run("sft", _sft_config(tmp_path / "fresh", total_steps=5))
    stop = StopRequest()
    _stop_after(monkeypatch, stop, 2)
    out = tmp_path / "run"
    stopped = runner.run("sft", _sft_config(out, total_steps=5), stop)
    assert stopped.saved_at_stop and stopped.last_step < 5
    monkeypatch.undo()
    resumed = runner.run("sft", _sft_config(out, total_steps=5, recover_mode="auto"))
    assert resumed.rows[0]["step"] == stopped.last_step + 1
    a, b = _weights(fresh.last_checkpoint), _weights(resumed.last_checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- the CLI, in a child process ---------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _cli(args: list[str], out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "realflow.quickstart", *args, f"output_dir={out}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(REPO),
    )


LONG_SFT = [
    "sft", "actor.path=builtin:tiny", "dataset.path=builtin:reverse", "n_seqs=4",
    "total_steps=100000", "tensorboard=false", "progress_bar=false",
]  # fmt: skip


def _wait_for_rows(out: Path, n: int, child: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert child.poll() is None, child.communicate()
        time.sleep(0.1)
    raise AssertionError("the run wrote no metrics in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_signal_saves_and_says_how_to_resume(tmp_path, sig, code):
    out = tmp_path / "run"
    child = _cli(LONG_SFT, out)
    _wait_for_rows(out, 2, child)
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    assert child.returncode == code, err
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    name = signal.Signals(sig).name
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        f"{name}: stopped after step {last}; saved {out}/checkpoints/step_{last}"
    )
    assert "Resume with: python -m realflow.quickstart sft " in line
    assert f"recover_mode=auto output_dir={out}" in line
    assert "Traceback" not in err
    check_checkpoints_intact(str(out), expect_latest=last)


@pytest.mark.slow
def test_cli_second_sigint_exits_at_once(tmp_path):
    out = tmp_path / "run"
    child = _cli([*LONG_SFT, "actor.max_tokens_per_mb=64"], out)
    _wait_for_rows(out, 1, child)
    child.send_signal(signal.SIGINT)
    time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "SIGINT received twice: exiting at once" in err
    assert "terminate called" not in err and "Traceback" not in err


BAD_REWARD = """
def helper(answer):
    return {}[answer]  # KeyError raised in the user's own file


def score(prompt, answer, metadata):
    return helper(answer)
"""


@pytest.mark.slow
def test_cli_failure_exits_1_with_the_users_frames(tmp_path):
    """A reward function that raises: exit 1 (not an abort), the RunFailure line, and the
    user's file and line numbers (twice, to catch an abort that happens only sometimes)."""
    fn = tmp_path / "my_reward.py"
    fn.write_text(BAD_REWARD)
    for i in range(2):
        child = _cli(
            [
                "grpo",
                "actor.path=builtin:tiny",
                "ref.path=builtin:tiny",
                "total_steps=3",
                "n_seqs=4",
                "reward.scorers=[python]",
                f"reward.args.python_fn={fn}:score",
                "tensorboard=false",
                "progress_bar=false",
            ],  # fmt: skip
            tmp_path / f"run{i}",
        )
        _, err = child.communicate(timeout=180)
        assert child.returncode == 1, err
        assert "error: run failed: MFC 'rew_inf' on worker 1 at step 1 failed: KeyError" in err
        assert f'File "{fn}", line 7, in score' in err
        assert f'File "{fn}", line 3, in helper' in err
        assert "terminate called" not in err


def test_cli_plugin_error_shows_the_users_frames(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text("import math\n\nVALUE = math.sqrt(-1)\n")
    child = _cli(["ppo", f"plugins=[{plugin}]", "--dry-run"], tmp_path / "run")
    _, err = child.communicate(timeout=120)
    assert child.returncode == 2, err
    assert f"plugin '{plugin}' failed while importing: ValueError: math domain error" in err
    assert f'File "{plugin}", line 3, in <module>' in err
    assert "Traceback" not in err
