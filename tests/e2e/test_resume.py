"""Exact resume of a real multi-model run. (tests/system covers the toy runs and a one-model sft
run; here PPO: four workers, sampling, two trained roles and interface state that must survive
the restart: an adaptive KL coefficient and running value statistics.)

A run with a checkpoint every 2 steps is interrupted at step 3 by an actor interface registered
here that raises on its 3rd train_step (built through an ExperimentConfig subclass, as a user's
plugin would be); the run resumed with recover_mode=auto and the normal interface must end with
weights equal, bit for bit, to those of an uninterrupted 4-step run, and log the same metrics."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from e2e_utils import read_metrics, safetensors_weights, tiny_config

from realflow.api.dfg import InterfaceSpec, MFCDef
from realflow.api.registry import INTERFACES
from realflow.experiments.ppo import PPOConfig
from realflow.interfaces.ppo import PPOActorInterface
from realflow.system.master import RunFailure
from realflow.system.runner import run

pytestmark = pytest.mark.timeout(600)

FAILING = "e2e_ppo_actor_failing_at_call_3"


class FailingPPOActor(PPOActorInterface):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.train_calls = 0

    def train_step(self, model, data, mb_spec):
        self.train_calls += 1
        if self.train_calls == 3:
            raise RuntimeError("injected failure in the 3rd train_step")
        return super().train_step(model, data, mb_spec)


@dataclasses.dataclass
class PPOWithFailingActor(PPOConfig):
    def mfcs(self) -> list[MFCDef]:
        mfcs = super().mfcs()
        train = next(m for m in mfcs if m.name == "actor_train")
        train.interface_impl = InterfaceSpec(FAILING, train.interface_impl.args)
        return mfcs


@pytest.fixture
def failing_actor_registered():
    INTERFACES.register(FAILING, FailingPPOActor)
    yield
    INTERFACES.unregister(FAILING)


def ppo_config(output_dir, cls: type = PPOConfig, **changes) -> PPOConfig:
    cfg = tiny_config(
        "ppo",
        output_dir,
        "total_steps=4",
        "save_freq_steps=2",
        "ppo.adaptive_kl_ctl=true",
        "ppo.adaptive_kl_target=0.1",
        "ppo.adaptive_kl_horizon=100",
        "ppo.value_norm=true",
        cls=cls,
    )
    return dataclasses.replace(cfg, **changes)


def without_time(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "time/step_s"}


@pytest.mark.slow
def test_ppo_interrupted_and_resumed_equals_uninterrupted(
    tmp_path, reverse_sft, failing_actor_registered
):
    fresh = run("ppo", ppo_config(tmp_path / "fresh"))
    kl_coefs = [r["kl_coef"] for r in fresh.rows]
    assert len(set(kl_coefs)) == 4  # the adaptive coefficient moves every step: state to restore

    out = tmp_path / "run"
    with pytest.raises(RunFailure, match="injected failure"):
        run("ppo", ppo_config(out, cls=PPOWithFailingActor))
    assert sorted(os.listdir(out / "checkpoints")) == ["step_2"]

    resumed = run("ppo", ppo_config(out, recover_mode="auto"))
    assert [r["step"] for r in resumed.rows] == [3, 4]
    assert [without_time(r) for r in resumed.rows] == [without_time(r) for r in fresh.rows[2:]]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    for role in ("actor", "critic"):
        a = safetensors_weights(os.path.join(fresh.last_checkpoint, role))
        b = safetensors_weights(os.path.join(resumed.last_checkpoint, role))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), role
