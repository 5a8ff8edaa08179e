"""Failed, hung and timed-out calls stop a run (mode=local) with a RunFailure that names the MFC,
the worker and the step; the CLI path exits non-zero; the last checkpoint stays intact."""

from __future__ import annotations

import time

import pytest
from systest_utils import check_checkpoints_intact, metric_steps, toy_config

from realflow.system import runner
from realflow.system.master import RunFailure
from realflow.system.toy_interfaces import ppo_like_nodes

pytestmark = pytest.mark.timeout(60)


def test_interface_exception_stops_the_run(tmp_path):
    nodes = ppo_like_nodes(0.0)
    nodes[2].fail_on_call = 3  # ref_inf (worker 2) at step 3
    cfg = toy_config(tmp_path, nodes, total_steps=5, save_freq_steps=1)
    with pytest.raises(RunFailure) as info:
        runner.run("toy", cfg)
    message = str(info.value)
    assert "MFC 'ref_inf'" in message and "worker 2" in message and "step 3" in message, message
    assert "RuntimeError: toy failure on call 3" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    check_checkpoints_intact(str(tmp_path), expect_latest=2)
    assert metric_steps(str(tmp_path)) == [1, 2]


def test_cli_path_exits_non_zero(tmp_path, capsys):
    nodes = ppo_like_nodes(0.0)
    nodes[4].fail_on_call = 2  # actor_train at step 2
    cfg = toy_config(tmp_path, nodes, total_steps=3)
    assert runner.run_experiment("toy", cfg) == 1
    err = capsys.readouterr().err
    assert "run failed: MFC 'actor_train' on worker 0 at step 2" in err, err
    assert "toy failure on call 2" in err


def test_hung_call_times_out(tmp_path):
    nodes = ppo_like_nodes(0.0)
    nodes[3].hang_on_call = 2  # critic_inf (worker 3) hangs at step 2
    nodes[3].hang_s = 30.0  # the abandoned worker thread ends by itself later
    cfg = toy_config(tmp_path, nodes, total_steps=4, save_freq_steps=1, mfc_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(RunFailure) as info:
        runner.run("toy", cfg)
    assert time.monotonic() - t0 < 25  # stopped by the timeout, not by the call ending
    message = str(info.value)
    assert "MFC 'critic_inf' on worker 3 at step 2 timed out after 1 s" in message, message
    check_checkpoints_intact(str(tmp_path), expect_latest=1)


def test_a_dataset_missing_a_key_the_graph_reads_fails_clearly(tmp_path):
    """A graph that reads a dataset key the dataset does not write used to wait forever."""
    import dataclasses
    from typing import ClassVar

    from realflow.system.toy_interfaces import ToyConfig, ToyNode

    @dataclasses.dataclass
    class NeedsScale(ToyConfig):
        dataset_keys: ClassVar[tuple[str, ...]] = ("packed_prompts", "loss_scale")

    nodes = [ToyNode("train", "actor", "train_step", ["packed_prompts", "loss_scale"])]
    cfg = NeedsScale(nodes=nodes, output_dir=str(tmp_path), total_steps=2)
    with pytest.raises(RunFailure, match=r"gave samples without keys \['loss_scale'\]"):
        runner.run("toy", cfg)
