"""Interrupt and resume (recover_mode=auto) against a fresh uninterrupted run."""

from __future__ import annotations

import os

import pytest
import torch
from systest_utils import check_checkpoints_intact, metric_steps, toy_config, without_time

from realflow.system import runner
from realflow.system.master import RunFailure
from realflow.system.toy_interfaces import ppo_like_nodes

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("fail_step", [3, 4])
def test_toy_resume_matches_uninterrupted_run(tmp_path, fail_step):
    """4 steps, a checkpoint every 2; a failure at step 3 or 4 resumes from step_2. Steps 3-4
    of the resumed run equal those of an uninterrupted run (the toy train calls count from
    their restored state), and metrics.jsonl holds every step once, even when the failed run
    had already written step 3."""
    fresh = runner.run("toy", toy_config(tmp_path / "fresh", ppo_like_nodes(), total_steps=4))

    failing = ppo_like_nodes()
    failing[4].fail_on_call = fail_step  # actor_train
    out = tmp_path / "run"
    cfg = toy_config(out, failing, total_steps=4, save_freq_steps=2)
    with pytest.raises(RunFailure, match=f"actor_train' on worker 0 at step {fail_step}"):
        runner.run("toy", cfg)
    check_checkpoints_intact(str(out), expect_latest=2)
    assert metric_steps(str(out)) == list(range(1, fail_step))

    resumed_cfg = toy_config(out, ppo_like_nodes(), total_steps=4, save_freq_steps=2)
    resumed_cfg.recover_mode = "auto"
    resumed = runner.run("toy", resumed_cfg)
    assert [r["step"] for r in resumed.rows] == [3, 4]
    assert [without_time(r) for r in resumed.rows] == [without_time(r) for r in fresh.rows[2:]]
    assert resumed.rows[-1]["actor_train/calls"] == 4.0
    assert metric_steps(str(out)) == [1, 2, 3, 4]
    check_checkpoints_intact(str(out), expect_latest=4)


def _sft_config(output_dir, total_steps=4, **kwargs):
    from realflow.experiments.sft import SFTConfig

    cfg = SFTConfig(
        output_dir=str(output_dir),
        total_steps=total_steps,
        n_seqs=8,
        tensorboard=False,
        progress_bar=False,
        **kwargs,
    )
    cfg.actor.path = "builtin:tiny"
    cfg.dataset.path = "builtin:reverse"
    return cfg


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    directory = os.path.join(checkpoint, "actor")
    found = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            found.update(load_file(os.path.join(directory, name)))
    assert found, f"no safetensors in {directory}"
    return found


@pytest.mark.slow
def test_sft_resume_gives_identical_weights(tmp_path, monkeypatch):
    """SFT interrupted by a failure at step 3 and resumed ends with the same weights as an
    uninterrupted 4-step run (same total_steps, so the same LR schedule)."""
    from realflow.interfaces.sft import SFTInterface

    fresh = runner.run("sft", _sft_config(tmp_path / "fresh"))

    train_step = SFTInterface.train_step
    calls = []

    def failing_train_step(self, model, data, mb_spec):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure at step 3")
        return train_step(self, model, data, mb_spec)

    out = tmp_path / "run"
    monkeypatch.setattr(SFTInterface, "train_step", failing_train_step)
    with pytest.raises(RunFailure, match="actor_train' on worker 0 at step 3"):
        runner.run("sft", _sft_config(out, save_freq_steps=2))
    monkeypatch.setattr(SFTInterface, "train_step", train_step)
    check_checkpoints_intact(str(out), expect_latest=2)

    resumed = runner.run("sft", _sft_config(out, save_freq_steps=2, recover_mode="auto"))
    assert [r["step"] for r in resumed.rows] == [3, 4]
    assert [without_time(r) for r in resumed.rows] == [without_time(r) for r in fresh.rows[2:]]
    assert metric_steps(str(out)) == [1, 2, 3, 4]
    a, b = _weights(fresh.last_checkpoint), _weights(resumed.last_checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
