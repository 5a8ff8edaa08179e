"""mode=ray: the schedule, freed stores, and failures (exception, kill -9, timeout) with worker
actors. One local cluster serves the module: the transport joins it instead of starting its own,
and kills its actors at the end of each run, which the tests check by pid."""

from __future__ import annotations

import os
import signal
import time

import pytest
from systest_utils import (
    Spy,
    check_checkpoints_intact,
    in_thread,
    run_ppo_like_and_check,
    toy_config,
)

from realflow.system import runner
from realflow.system.master import RunFailure
from realflow.system.toy_interfaces import ppo_like_nodes
from realflow.system.worker import Kind

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
    yield
    if started:
        ray.shutdown()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_workers_gone(spy: Spy, within_s: float = 60.0) -> None:
    """Every worker actor process of the run has exited."""
    pids = spy.transports[-1].pids
    assert pids and os.getpid() not in pids
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if _alive(p)], f"worker processes left: {pids}"


def test_ppo_like_trace_ray(tmp_path, monkeypatch):
    spy = Spy(monkeypatch, store_check=True)
    run_ppo_like_and_check(tmp_path, spy, "ray")
    assert_workers_gone(spy)


def test_interface_exception_ray(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    nodes = ppo_like_nodes(0.0)
    nodes[5].fail_on_call = 3  # critic_train (worker 3) at step 3
    cfg = toy_config(tmp_path, nodes, total_steps=5, save_freq_steps=1, mode="ray")
    with pytest.raises(RunFailure) as info:
        runner.run("toy", cfg)
    message = str(info.value)
    assert "MFC 'critic_train' on worker 3 at step 3 failed" in message, message
    assert "RuntimeError: toy failure on call 3" in message
    # The actor's traceback comes back with the failure (its frames name the raising line).
    assert 'toy_interfaces.py", line' in info.value.traceback_text, info.value.traceback_text
    assert "in _work" in info.value.traceback_text
    check_checkpoints_intact(str(tmp_path), expect_latest=2)
    assert_workers_gone(spy)


def test_killed_worker_ray(tmp_path, monkeypatch, capsys):
    """kill -9 on the actor of a call in flight: the run fails at once through the CLI path."""
    spy = Spy(monkeypatch)
    nodes = ppo_like_nodes(0.0)
    nodes[1].hang_on_call = 3  # rew_inf (worker 1) stays in flight at step 3 until killed
    cfg = toy_config(tmp_path, nodes, total_steps=5, save_freq_steps=1, mode="ray")
    killed = []

    def kill_when_in_flight() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (Kind.MFC, "rew_inf", 3) in spy.calls_in_flight():
                time.sleep(0.5)  # let the actor start the call
                pid = spy.transports[-1].pids[1]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = in_thread(kill_when_in_flight)
    assert runner.run_experiment("toy", cfg) == 1
    killer.join(5)
    assert killed, "the call never got in flight"
    err = capsys.readouterr().err
    assert "MFC 'rew_inf' on worker 1 at step 3 failed" in err, err
    assert f"worker process (pid {killed[0]}) died" in err, err
    check_checkpoints_intact(str(tmp_path), expect_latest=2)
    assert_workers_gone(spy)


def test_timeout_ray(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    nodes = ppo_like_nodes(0.0)
    nodes[0].hang_on_call = 2  # actor_gen (worker 0) hangs at step 2
    cfg = toy_config(
        tmp_path, nodes, total_steps=4, save_freq_steps=1, mfc_timeout_s=2.0, mode="ray"
    )
    with pytest.raises(RunFailure) as info:
        runner.run("toy", cfg)
    message = str(info.value)
    assert "MFC 'actor_gen' on worker 0 at step 2 timed out after 2 s" in message, message
    check_checkpoints_intact(str(tmp_path), expect_latest=1)
    assert_workers_gone(spy)  # the hung actor is killed, not left running
