"""The built-in experiment configs: valid defaults, graphs that match their roles, the rules across
fields, the shipped presets, and --help defaults as the experiments set them."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from realflow.api.config import (
    ConfigError,
    apply_overrides,
    describe_fields,
    leaf_paths,
    to_dict,
    validate,
)
from realflow.api.dfg import InterfaceType
from realflow.api.registry import EXPERIMENTS

REPO = Path(__file__).resolve().parents[2]
BUILTINS = ["sft", "rw", "dpo", "ppo", "grpo"]


def problems_of(exp: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        apply_overrides(EXPERIMENTS.get(exp), overrides)
    return e.value.problems


@pytest.mark.parametrize("exp", BUILTINS)
def test_defaults_are_valid_and_the_graph_builds(exp):
    cls = EXPERIMENTS.get(exp)
    cfg = apply_overrides(cls)
    assert validate(cfg) == []
    dfg = cfg.dfg()
    roles = cfg.roles()
    assert {m.model_name for m in dfg.mfcs} == set(roles)  # every role is used, no other model
    assert all(m.n_seqs == cfg.n_seqs for m in dfg.mfcs)
    assert dfg.dataset_keys == frozenset(cfg.dataset_keys)
    read = {k for m in dfg.mfcs for k in m.input_keys}
    assert set(cfg.dataset_keys) <= read  # the dataset's keys are all used
    trained = {m.model_name for m in dfg.mfcs if m.interface_type is InterfaceType.TRAIN_STEP}
    assert trained and trained <= set(roles)
    assert to_dict(cfg)["n_seqs"] == cfg.n_seqs


@pytest.mark.parametrize("exp", BUILTINS)
def test_shipped_preset_is_valid(exp):
    cfg = apply_overrides(EXPERIMENTS.get(exp), [], [str(REPO / "configs" / f"{exp}_tiny.yaml")])
    assert cfg.total_steps == 2 and cfg.n_seqs <= 8
    cfg.dfg()


def test_roles_and_heads():
    ppo = EXPERIMENTS.get("ppo")()
    assert {r: role.head for r, role in ppo.roles().items()} == {
        "actor": "lm",
        "critic": "critic",
        "ref": "lm",
        "rew": "none",  # the default task scorer needs no reward model
    }
    ppo.reward.scorers = ["task", "model"]
    assert ppo.roles()["rew"].head == "reward"
    assert "critic" not in EXPERIMENTS.get("grpo")().roles()
    assert set(EXPERIMENTS.get("dpo")().roles()) == {"actor", "ref"}


def test_ref_outputs_are_remapped_so_they_do_not_clash_with_the_actor():
    for exp in ("ppo", "grpo", "dpo"):
        ref = EXPERIMENTS.get(exp)().dfg().mfc("ref_inf")
        assert ref.output_keys and all(k.startswith("ref_") for k in ref.output_keys)
        assert set(ref.output_key_remap.values()) == set(ref.output_keys)


@pytest.mark.parametrize(
    "exp, overrides, expected",
    [
        ("ppo", ["n_seqs=10", "ppo.ppo_n_minibatches=4"], "ppo.ppo_n_minibatches (4) must divide n_seqs (10)"),
        ("grpo", ["n_seqs=10", "grpo.n_minibatches=4"], "grpo.n_minibatches (4) must divide n_seqs (10)"),
        ("ppo", ["ppo.ppo_n_minibatches=0"], "ppo.ppo_n_minibatches: 0 must be > 0"),
        ("grpo", ["grpo.n_minibatches=0"], "grpo.n_minibatches: 0 must be > 0"),
        ("ppo", ["ppo.gen.min_new_tokens=9", "ppo.gen.max_new_tokens=8"], "ppo.gen.min_new_tokens (9) must be <= max_new_tokens (8)"),
        ("grpo", ["grpo.gen.top_p=1.5"], "grpo.gen.top_p (1.5) must be <= 1"),
        ("ppo", ["ppo.discount=1.5"], "ppo.discount (1.5) and gae_lambda (1.0) must be <= 1"),
        ("grpo", ["grpo.group_size=1"], "grpo.group_size: 1 must be > 1"),
        ("dpo", ["dpo.label_smoothing=0.5"], "dpo.label_smoothing (0.5) must be < 0.5"),
        ("dpo", ["dpo.loss=ipoo"], "dpo.loss: unknown dpo loss 'ipoo'. Known: ipo, sigmoid. Did you mean 'ipo'?"),
        ("sft", ["allocation.critic=0"], "allocation: unknown role 'critic'; roles are actor"),
        ("ppo", ["allocation.actor=-1"], "allocation.actor: worker index (-1) must be >= 0"),
        ("ppo", ["reward.weights=[1,2]"], "reward.weights: 2 weights for 1 scorers ['task']"),
        ("ppo", ["reward.scorers=[]"], "reward.scorers: name at least one reward scorer"),
        ("rw", ["rew.zero_stage=4"], "rew.zero_stage: 4 is not one of 0, 1, 2, 3"),
    ],
)  # fmt: skip
def test_rules_across_fields(exp, overrides, expected):
    assert expected in problems_of(exp, *overrides)


@pytest.mark.parametrize("exp", ["ppo", "grpo"])
def test_unknown_reward_scorer_is_listed_with_the_other_problems(exp):
    # roles() asked the registry for every scorer and raised at the first unknown one, which
    # hid the other problems and the dotted path.
    problems = problems_of(exp, "reward.scorers=[taks]", "n_seqs=-2")
    assert len(problems) == 2, problems
    assert "n_seqs: -2 must be > 0" in problems
    (scorer,) = [p for p in problems if p.startswith("reward.scorers: ")]
    assert scorer.startswith("reward.scorers: unknown reward scorer 'taks'. Known: ")
    assert "Did you mean 'task'?" in scorer


def test_an_optimizer_problem_is_reported_once():
    # ModelConfig.validate repeated what the generic recursion already reports.
    assert problems_of("sft", "actor.optimizer.lr=-1") == [
        "actor.optimizer.lr (-1.0) must be positive"
    ]


@pytest.mark.parametrize("exp", BUILTINS)
def test_help_defaults_are_the_experiments_own(exp):
    cls = EXPERIMENTS.get(exp)
    text = describe_fields(cls)
    instance = cls()
    for path in leaf_paths(cls):
        value = functools.reduce(getattr, path.split("."), instance)
        assert re.search(
            rf"^  {re.escape(path)} \(.+, default {re.escape(repr(value))}\)$", text, re.M
        ), path
