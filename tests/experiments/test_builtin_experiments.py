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
    attr_path,
    describe_fields,
    leaf_paths,
    to_dict,
    validate,
)
from realflow.api.dfg import InterfaceType
from realflow.api.registry import EXPERIMENTS

REPO = Path(__file__).resolve().parents[2]
BUILTINS = ["sft", "rw", "dpo", "ppo", "grpo", "rloo", "reinforce_pp", "dapo"]


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
    for exp in ("ppo", "grpo", "dpo", "rloo", "reinforce_pp"):
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
        ("rloo", ["rloo.group_size=1"], "rloo.group_size: 1 must be > 1"),
        ("reinforce_pp", ["reinforce_pp.group_size=0"], "reinforce_pp.group_size: 0 must be > 0"),
        ("reinforce_pp", ["reinforce_pp.gamma=1.5"], "reinforce_pp.gamma (1.5) must be <= 1"),
        ("rloo", ["n_seqs=10", "rloo.n_minibatches=4"], "rloo.n_minibatches (4) must divide n_seqs (10)"),
        ("dapo", ["dapo.overlong_buffer_len=20"], "dapo.overlong_buffer_len (20) must be <= gen.max_new_tokens (16)"),
        ("dapo", ["dapo.max_rounds=0"], "dapo.max_rounds: 0 must be > 0"),
        ("grpo", ["grpo.loss_type=bnpo"], "grpo.loss_type: 'bnpo' is not one of 'dapo', 'grpo', 'dr_grpo'"),
        ("grpo", ["grpo.scale_rewards=std"], "grpo.scale_rewards: 'std' is not one of 'group', 'batch', 'none'"),
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
        # attr_path: the attribute behind a key that is a Python keyword (async -> async_)
        value = functools.reduce(getattr, attr_path(cls, path).split("."), instance)
        assert re.search(
            rf"^  {re.escape(path)} \(.+, default {re.escape(repr(value))}\)$", text, re.M
        ), path


# ---- the critic-free experiments: what selects which graph ------------------------------------


def mfc_names(exp: str, *overrides: str) -> list[str]:
    return [m.name for m in apply_overrides(EXPERIMENTS.get(exp), overrides).dfg().mfcs]


@pytest.mark.parametrize("exp", ["grpo", "rloo", "reinforce_pp"])
def test_no_kl_term_drops_the_reference_model(exp):
    assert mfc_names(exp) == ["actor_gen", "rew_inf", "ref_inf", "actor_train"]
    cfg = apply_overrides(EXPERIMENTS.get(exp), [f"{exp}.kl_beta=0"])
    assert [m.name for m in cfg.dfg().mfcs] == ["actor_gen", "rew_inf", "actor_train"]
    assert set(cfg.roles()) == {"actor", "rew"}
    assert "ref_logprobs" not in cfg.dfg().mfc("actor_train").input_keys


def test_dapo_graph_is_grpo_with_a_sampling_loop_and_no_reference():
    dfg = apply_overrides(EXPERIMENTS.get("dapo")).dfg()
    assert [m.name for m in dfg.mfcs] == ["actor_gen", "rew_inf", "dyn_filter", "actor_train"]
    assert dfg.filter is not None and dfg.filter.name == "dyn_filter"
    assert dfg.filter.filter_loop.max_rounds == 4
    assert dfg.loop == {"actor_gen", "rew_inf", "dyn_filter"}
    assert "rloo_actor" not in {m.interface_impl.type_ for m in dfg.mfcs}
    actor = dfg.mfc("actor_train").interface_impl
    assert actor.type_ == "grpo_actor"
    assert "max_rounds" not in actor.args and "dynamic_sampling" not in actor.args
    assert actor.args["eps_clip_high"] == 0.28 and actor.args["kl_beta"] == 0.0
    assert mfc_names("dapo", "dapo.dynamic_sampling=false") == [
        "actor_gen",
        "rew_inf",
        "actor_train",
    ]
    with_kl = mfc_names("dapo", "dapo.kl_beta=0.01")
    assert with_kl == ["actor_gen", "rew_inf", "dyn_filter", "ref_inf", "actor_train"]


def test_dr_grpo_preset():
    cfg = apply_overrides(EXPERIMENTS.get("grpo"), [], [str(REPO / "configs" / "dr_grpo.yaml")])
    assert (cfg.grpo.scale_rewards, cfg.grpo.loss_type) == ("none", "dr_grpo")
    args = cfg.dfg().mfc("actor_train").interface_impl.args
    assert (args["scale_rewards"], args["loss_type"]) == ("none", "dr_grpo")


@pytest.mark.parametrize("exp", ["grpo", "rloo", "reinforce_pp", "dapo"])
def test_help_names_the_loss_types_as_trl_does(exp):
    text = describe_fields(EXPERIMENTS.get(exp))
    (line,) = [i for i, row in enumerate(text.splitlines()) if f"{exp}.loss_type (" in row]
    doc = text.splitlines()[line + 1]
    assert "TRL's GRPOConfig.loss_type" in doc
    for name in ("'dapo'", "'grpo'", "'dr_grpo'", "'bnpo'"):
        assert name in doc
