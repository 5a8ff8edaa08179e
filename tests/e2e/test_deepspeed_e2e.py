"""SFT runs on the deepspeed backend (ZeRO-1, 2, 3) through the runner, as a user runs them.

Each run's saved checkpoint must hold full weights that transformers loads, with the logits of
the same run on the torch backend; and a run interrupted at step 3 and resumed with
recover_mode=auto must end bit for bit like the uninterrupted one. (tests/engines covers the
engine alone, and two data-parallel ranks: an experiment cannot have those yet, each model
lives on one worker.)

ZeRO-3 keeps parameters under `stage3_param_persistence_threshold` (1e5 elements by default,
all of a tiny model's) whole; the tests set it to 0 so that, as with a real model's large
parameters, the module holds empty (0,) partitions between calls and a save that read the
module instead of the gathered weights would fail.
"""

from __future__ import annotations

import os

import pytest
import torch
from e2e_utils import safetensors_weights, tiny_config

from realflow.system.master import RunFailure
from realflow.system.runner import run

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.timeout(900)]

# deepspeed and torch run the same fp32 AdamW on the same gradients; they differ only in how
# gradients are flattened and their norm summed, i.e. in fp32 rounding (~1e-7 relative per
# step). After 4 steps the logits (|logit| < 1) differ by ~3e-7; 1e-5 leaves room for other
# kernels and is far below what one step of training changes (checked below: > 1e-3).
LOGIT_ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def ds_world():
    """One process group (and one deepspeed op build) for the module; torn down after."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from realflow.engines.deepspeed_engine import ensure_process_group

    env = dict(os.environ)
    created = ensure_process_group()
    yield
    if created:
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


@pytest.fixture(autouse=True)
def zero3_partitions_every_parameter(monkeypatch):
    import realflow.engines.deepspeed_engine as ds

    make = ds.deepspeed_config

    def partitioning(engine_cfg, optim_cfg):
        config = make(engine_cfg, optim_cfg)
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return config

    monkeypatch.setattr(ds, "deepspeed_config", partitioning)


def sft(output_dir, *overrides: str, **changes):
    cfg = tiny_config("sft", output_dir, "total_steps=4", "save_freq_steps=2", *overrides)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def hf_logits(checkpoint: str) -> torch.Tensor:
    """Logits of the saved actor, loaded by transformers, on fixed random token ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(checkpoint, "actor")).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    return run("sft", sft(tmp_path_factory.mktemp("torch") / "run"))


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time/step_s"} for r in rows]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_sft_saves_full_weights_and_resumes_exactly(stage, torch_run, tmp_path, monkeypatch):
    ds_keys = ("actor.backend=deepspeed", f"actor.zero_stage={stage}")
    straight = run("sft", sft(tmp_path / "straight", *ds_keys))

    want = hf_logits(torch_run.last_checkpoint)
    got = hf_logits(straight.last_checkpoint)
    assert (got - want).abs().max().item() <= LOGIT_ATOL
    two_steps_earlier = hf_logits(
        os.path.join(os.path.dirname(torch_run.last_checkpoint), "step_2")
    )
    assert (want - two_steps_earlier).abs().max().item() > 1e-2

    from realflow.interfaces.sft import SFTInterface

    out = tmp_path / "resumed"
    train_step = SFTInterface.train_step
    calls = []

    def failing(self, model, data, mb_spec):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure at step 3")
        return train_step(self, model, data, mb_spec)

    monkeypatch.setattr(SFTInterface, "train_step", failing)
    with pytest.raises(RunFailure, match="at step 3"):
        run("sft", sft(out, *ds_keys))
    monkeypatch.setattr(SFTInterface, "train_step", train_step)
    resumed = run("sft", sft(out, *ds_keys, recover_mode="auto"))
    assert [r["step"] for r in resumed.rows] == [3, 4]
    assert without_time(resumed.rows) == without_time(straight.rows[2:])
    a = safetensors_weights(os.path.join(straight.last_checkpoint, "actor"))
    b = safetensors_weights(os.path.join(resumed.last_checkpoint, "actor"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
