"""RL runs must learn: a short run of each RL experiment on the built-in task raises the task
reward by a clear margin, and PPO's critic learns to predict the returns.

Each test also runs with a planted bug that reverses what the run learns from (the advantages,
or the critic's targets) and checks that the same learning check then fails: a test that passes
with training pointed the wrong way would protect nothing.

Figures that set the margins (seed 1, CPU, 2026-11-29): ppo 200 steps: reward/mean 0.20 -> 0.32
(first vs last 10%), |values/mean - returns/mean| <= 0.01 over the last 20%; grpo 120 steps:
0.23 -> 0.55; rloo 120 steps: 0.23 -> 0.44 (negated advantages: 0.09 -> 0.02); reinforce_pp 120
steps: 0.24 -> 0.52 (negated: 0.10 -> 0.00); dapo 120 steps, rewards of every generated answer
(rew_inf/rewards/mean: the trained batch is filtered): 0.23 -> 0.51 (negated: 0.10 -> 0.00); Dr.
GRPO (grpo with scale_rewards=none, loss_type=dr_grpo) 120 steps: 0.22 -> 0.40 (negated: 0.13 ->
0.05).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import pytest

from realflow.system.runner import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PPO_STEPS, PPO_MIN_GAIN = 200, 0.06
GRPO_STEPS, GRPO_MIN_GAIN = 120, 0.15
# rloo, reinforce_pp, dapo, Dr. GRPO: the same budget as grpo's test (120 steps, 64 answers a
# step; dapo generates up to dapo.max_rounds x that for its sampling loop).
CRITIC_FREE_STEPS, CRITIC_FREE_MIN_GAIN = 120, 0.12
MAX_CRITIC_GAP = 0.05


def reward_gain(rows: list[dict[str, Any]], key: str = "reward/mean") -> float:
    """Mean reward of the last 10% of steps minus that of the first 10%."""
    n = max(1, len(rows) // 10)
    first = statistics.mean(r[key] for r in rows[:n])
    last = statistics.mean(r[key] for r in rows[-n:])
    return last - first


def critic_gap(rows: list[dict[str, Any]]) -> float:
    """Mean |critic value - return| over the last 20% of steps (both means over answer tokens)."""
    tail = rows[-max(1, len(rows) // 5) :]
    return statistics.mean(
        abs(r["critic_train/values/mean"] - r["critic_train/returns/mean"]) for r in tail
    )


def ppo_problems(rows: list[dict[str, Any]]) -> list[str]:
    problems = []
    if reward_gain(rows) < PPO_MIN_GAIN:
        problems.append(f"reward gain {reward_gain(rows):.3f} < {PPO_MIN_GAIN}")
    if critic_gap(rows) > MAX_CRITIC_GAP:
        problems.append(f"critic misses the returns by {critic_gap(rows):.3f}")
    return problems


def _negate_actor_advantages(monkeypatch: Any) -> None:
    from realflow.interfaces import ppo

    whiten = ppo.dp_masked_whiten
    monkeypatch.setattr(ppo, "dp_masked_whiten", lambda x, m, *a, **k: -whiten(x, m, *a, **k))


def _negate_critic_targets(monkeypatch: Any) -> None:
    from realflow.interfaces.ppo import PPOCriticInterface

    init = PPOCriticInterface.__init__

    def init_negated(self: Any, **kwargs: Any) -> None:
        init(self, **kwargs)
        compute = self.returns.compute
        self.returns.compute = lambda data, *args: (
            lambda b: dataclasses.replace(b, returns_T1=-b.returns_T1)
        )(compute(data, *args))

    monkeypatch.setattr(PPOCriticInterface, "__init__", init_negated)


def _negate_group_advantages(monkeypatch: Any) -> None:
    from realflow.interfaces import grpo

    norm = grpo.group_normalized_advantages
    monkeypatch.setattr(grpo, "group_normalized_advantages", lambda *a, **k: -norm(*a, **k))


def _config(name: str, tmp_path: Any, steps: int) -> Any:
    from realflow.api.registry import EXPERIMENTS

    return EXPERIMENTS.get(name)(
        output_dir=str(tmp_path), total_steps=steps, tensorboard=False, progress_bar=False
    )


@pytest.mark.parametrize("bug", [None, "negated_advantages", "negated_critic_targets"])
def test_ppo_learns_the_task(tmp_path, reverse_sft, monkeypatch, bug):
    if bug == "negated_advantages":
        _negate_actor_advantages(monkeypatch)
    elif bug == "negated_critic_targets":
        _negate_critic_targets(monkeypatch)
    rows = run("ppo", _config("ppo", tmp_path, PPO_STEPS)).rows
    problems = ppo_problems(rows)
    if bug is None:
        assert problems == []
    else:
        assert problems, f"the learning check passed with {bug}"


@pytest.mark.parametrize("bug", [None, "negated_advantages"])
def test_grpo_learns_the_task(tmp_path, reverse_sft, monkeypatch, bug):
    if bug is not None:
        _negate_group_advantages(monkeypatch)
    gain = reward_gain(run("grpo", _config("grpo", tmp_path, GRPO_STEPS)).rows)
    if bug is None:
        assert gain >= GRPO_MIN_GAIN
    else:
        assert gain < GRPO_MIN_GAIN, f"the learning check passed with {bug}: gain {gain:.3f}"


def _negate(monkeypatch: Any, module: str, name: str) -> None:
    """Replace `module.name` (an advantage function) by one returning the negated advantages
    (the first element of a tuple result)."""
    import importlib

    m = importlib.import_module(module)
    fn = getattr(m, name)

    def negated(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        return (-out[0], *out[1:]) if isinstance(out, tuple) else -out

    monkeypatch.setattr(m, name, negated)


# run -> (experiment, changed hyperparameters, where its advantages come from, the reward of
# every answer it generated)
CRITIC_FREE = {
    "rloo": ("rloo", {}, ("realflow.interfaces.rloo", "rloo_advantages"), "reward/mean"),
    "reinforce_pp": (
        "reinforce_pp",
        {},
        ("realflow.interfaces.reinforce_pp", "dp_masked_whiten"),
        "reward/mean",
    ),
    # actor_train's reward/mean is over the samples dynamic sampling kept: biased
    "dapo": (
        "dapo",
        {},
        ("realflow.interfaces.grpo", "group_normalized_advantages"),
        "rew_inf/rewards/mean",
    ),
    "dr_grpo": (
        "grpo",
        {"scale_rewards": "none", "loss_type": "dr_grpo"},
        ("realflow.interfaces.grpo", "group_normalized_advantages"),
        "reward/mean",
    ),
}


# With its advantages negated, each run must fail the check; dapo and Dr. GRPO take theirs from
# grpo's `group_normalized_advantages`, whose negated run is test_grpo_learns_the_task's.
CRITIC_FREE_RUNS = [(name, None) for name in CRITIC_FREE] + [
    ("rloo", "negated_advantages"),
    ("reinforce_pp", "negated_advantages"),
]


@pytest.mark.parametrize(("name", "bug"), CRITIC_FREE_RUNS)
def test_critic_free_experiments_learn_the_task(tmp_path, reverse_sft, monkeypatch, name, bug):
    exp, changes, (module, fn), key = CRITIC_FREE[name]
    if bug is not None:
        _negate(monkeypatch, module, fn)
    cfg = _config(exp, tmp_path, CRITIC_FREE_STEPS)
    for field, value in changes.items():
        setattr(cfg.hyperparameters(), field, value)
    rows = run(exp, cfg).rows
    gain = reward_gain(rows, key)
    if bug is not None:
        assert gain < CRITIC_FREE_MIN_GAIN, f"the learning check passed with {bug}: gain {gain:.3f}"
        return
    assert gain >= CRITIC_FREE_MIN_GAIN, f"{name}: gain {gain:.3f}"
    if exp == "dapo":  # the loop ran: some steps needed more than one batch
        assert max(r["dyn_filter/rounds"] for r in rows) > 1
