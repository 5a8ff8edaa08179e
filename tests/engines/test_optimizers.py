"""Optimizers by name, parameter groups by name pattern and registered LR schedules, checked
against torch.optim run directly, a hand-written AdamW step and the schedule's formula."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from engine_testutils import build, loss_fn, make_batch, make_model, n_targets

from realflow.api.config import ConfigError, apply_overrides, describe_fields
from realflow.api.registry import LR_SCHEDULES, OPTIMIZERS
from realflow.engines.config import ParamGroupConfig
from realflow.engines.optimizers import TORCH_OPTIMIZERS, OptimizerError

CONSTANT = dict(lr_scheduler_type="constant", warmup_steps_proportion=0.0, gradient_clipping=0.0)


def test_registered_names_are_the_declared_ones():
    declared = set(OPTIMIZERS._builtin_names)
    OPTIMIZERS._load_builtins()
    assert (
        declared
        == set(TORCH_OPTIMIZERS)
        == {n for n, f in OPTIMIZERS._entries.items() if type(f).__module__.startswith("realflow.")}
    )
    assert set(LR_SCHEDULES._builtin_names) == {"constant", "cosine", "linear"}


@pytest.mark.parametrize(
    ("name", "args", "torch_kwargs"),
    [
        ("sgd", {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": True}),
        ("rmsprop", {"alpha": 0.9, "eps": 1e-6}, {"alpha": 0.9, "eps": 1e-6}),
        ("adam", {"amsgrad": True}, {"amsgrad": True, "betas": (0.9, 0.95), "eps": 1e-5}),
        ("adafactor", {"beta2_decay": -0.5}, {"beta2_decay": -0.5}),
    ],
)
def test_named_optimizer_steps_like_torch_optim(name, args, torch_kwargs):
    if name == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor needs torch >= 2.5")
    engine = build(name=name, args=args, lr=0.05, **CONSTANT)
    model = make_model()
    cls = getattr(torch.optim, TORCH_OPTIMIZERS[name])
    optimizer = cls(model.parameters(), lr=0.05, **torch_kwargs)
    assert type(engine.backend.optimizer) is cls
    for seed in range(3):
        batch = make_batch(6, seed=seed)
        engine.train_batch([batch], loss_fn, n_targets)
        loss, _ = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for (n, want), got in zip(model.state_dict().items(), engine.module_state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=n)


def test_param_groups_step_like_a_hand_written_adamw():
    """AdamW's first step is `p * (1 - lr * wd) - lr * g / (|g| + eps)`; each parameter with
    its group's lr and decay (1-D parameters never decay), all scaled by the warmup factor."""
    groups = [
        ParamGroupConfig(pattern="emb.*", lr=0.1),
        ParamGroupConfig(pattern="head.weight", weight_decay=0.5),
    ]
    engine = build(
        lr=0.01,
        weight_decay=0.1,
        param_groups=groups,
        warmup_steps_proportion=0.5,
        total_steps=4,
        gradient_clipping=0.0,
    )
    factor = 0.5  # step 0 of 2 warmup steps
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = make_batch(6, seed=3)
    loss, _ = loss_fn(model, batch)
    loss.backward()
    stats = engine.train_batch([batch], loss_fn, n_targets)
    assert stats["lr"] == 0.01 * factor
    settings = {  # name -> (peak lr, weight decay)
        "emb.weight": (0.1, 0.1),
        "fc.weight": (0.01, 0.1),
        "fc.bias": (0.01, 0.0),
        "head.weight": (0.01, 0.5),
        "head.bias": (0.01, 0.0),
    }
    got = engine.module_state_dict()
    eps = engine.optim_cfg.eps
    for name, p in model.named_parameters():
        lr, wd = settings[name]
        lr *= factor
        g = p.grad
        want = before[name] * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-7, msg=name)
    lrs = {tuple(g["names"]): g["lr"] for g in engine.backend.optimizer.param_groups}
    assert lrs == {
        ("fc.weight",): 0.01 * factor,
        ("fc.bias", "head.bias"): 0.01 * factor,
        ("emb.weight",): 0.1 * factor,
        ("head.weight",): 0.01 * factor,
    }


def step_decay(progress: float, min_lr_ratio: float, every: float = 0.5) -> float:
    return max(min_lr_ratio, 0.1 ** int(progress / every))


@pytest.fixture
def step_decay_registered():
    LR_SCHEDULES.register("test_step_decay", step_decay)
    yield
    LR_SCHEDULES.unregister("test_step_decay")


def test_registered_schedule_sets_every_group_lr(step_decay_registered):
    engine = build(
        lr=1.0,
        total_steps=10,
        warmup_steps_proportion=0.2,
        lr_scheduler_type="test_step_decay",
        lr_scheduler_args={"every": 0.25},
        min_lr_ratio=0.005,
        param_groups=[ParamGroupConfig(pattern="head.*", lr=3.0)],
    )
    for step in range(10):
        progress = (step - 2) / 8
        factor = (step + 1) / 2 if step < 2 else max(0.005, 0.1 ** int(progress / 0.25))
        stats = engine.train_batch([make_batch(4, seed=step)], loss_fn, n_targets)
        assert stats["lr"] == pytest.approx(factor)
        head = [
            g["lr"] for g in engine.backend.optimizer.param_groups if "head.weight" in g["names"]
        ]
        assert head == [pytest.approx(3.0 * factor)]


def test_resume_keeps_group_lrs_and_optimizer_state():
    groups = [ParamGroupConfig(pattern="fc.*", lr=0.03, weight_decay=0.2)]
    straight = build(name="sgd", args={"momentum": 0.9}, param_groups=groups)
    for seed in range(4):
        straight.train_batch([make_batch(5, seed=seed)], loss_fn, n_targets)
    first = build(name="sgd", args={"momentum": 0.9}, param_groups=groups)
    for seed in range(2):
        first.train_batch([make_batch(5, seed=seed)], loss_fn, n_targets)
    resumed = build(
        name="sgd", args={"momentum": 0.9}, param_groups=groups, state=first.module_state_dict()
    )
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for seed in range(2, 4):
        resumed.train_batch([make_batch(5, seed=seed)], loss_fn, n_targets)
    for k, v in straight.module_state_dict().items():
        assert torch.equal(resumed.module_state_dict()[k], v), k


def test_build_time_errors_name_what_to_change():
    with pytest.raises(OptimizerError, match=r"\['nothing\.\*'\] match no trainable parameter"):
        build(param_groups=[ParamGroupConfig(pattern="nothing.*", lr=1.0)])
    with pytest.raises(OptimizerError, match="only ones an earlier pattern took"):
        build(
            param_groups=[
                ParamGroupConfig(pattern="fc.*", lr=1.0),
                ParamGroupConfig(pattern="fc.weight", lr=2.0),
            ]
        )


def test_config_errors_are_reported_before_a_run():
    from realflow.experiments.sft import SFTConfig

    with pytest.raises(ConfigError) as err:
        apply_overrides(
            SFTConfig,
            [
                "actor.optimizer.name=sgdd",
                "actor.optimizer.lr_scheduler_type=cosin",
                "critic.optimizer.lr=1",
            ],
        )
    text = "\n".join(err.value.problems)
    assert "actor.optimizer.name 'sgdd' unknown" in text and "did you mean 'sgd'?" in text
    assert "did you mean 'cosine'?" in text
    with pytest.raises(ConfigError) as err:
        apply_overrides(
            SFTConfig,
            [
                "actor.optimizer.name=sgd",
                "actor.optimizer.args.momentun=0.9",
                "actor.optimizer.beta1=0.5",
                "actor.optimizer.param_groups=[{pattern: 'embed_tokens.*'}]",
            ],
        )
    text = "\n".join(err.value.problems)
    assert "actor.optimizer.args.momentun: sgd takes no argument 'momentun'" in text
    assert "(did you mean 'momentum'?)" in text
    assert "actor.optimizer.beta1 (0.5) is set, but sgd takes no betas" in text
    assert "param_groups[0] ('embed_tokens.*') sets neither lr nor weight_decay" in text
    with pytest.raises(ConfigError, match="Key 'patern' not in 'ParamGroupConfig'"):
        apply_overrides(SFTConfig, ["actor.optimizer.param_groups=[{patern: x, lr: 1}]"])
    with pytest.raises(ConfigError, match="lr_scheduler_args"):
        apply_overrides(SFTConfig, ["actor.optimizer.lr_scheduler_args.steepness=2"])
    cfg = apply_overrides(
        SFTConfig,
        [
            "actor.optimizer.name=rmsprop",
            "actor.optimizer.args.momentum=0.5",
            "actor.optimizer.param_groups=[{pattern: 'embed_tokens.*', lr: 1e-5}]",
        ],
    )
    assert cfg.actor.optimizer.param_groups == [ParamGroupConfig("embed_tokens.*", 1e-5, None)]
    help_text = describe_fields(SFTConfig)
    for key in ("actor.optimizer.name", "actor.optimizer.args", "actor.optimizer.param_groups"):
        assert key in help_text
    assert math.isfinite(cfg.actor.optimizer.lr)
