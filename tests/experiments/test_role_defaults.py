"""Roles that read the actor's tokens default to the actor's model: an empty path, documented in
--help as "same as actor.path", shown as such by --dry-run and resolved in one place
(`ExperimentConfig.with_role_defaults`)."""

from __future__ import annotations

import pytest

from realflow.api.config import apply_overrides, describe_fields
from realflow.api.registry import EXPERIMENTS
from realflow.experiments.common import SAME_AS_ACTOR

# experiment -> roles whose path follows the actor by default
FOLLOWERS = {"ppo": ["critic", "ref"], "grpo": ["ref"], "dpo": ["ref"]}


@pytest.mark.parametrize("exp", sorted(FOLLOWERS))
def test_help_documents_the_default(exp):
    lines = describe_fields(EXPERIMENTS.get(exp)).splitlines()
    for role in FOLLOWERS[exp]:
        row = lines.index(f"  {role}.path (str, default '')")
        assert "Empty: same as actor.path" in lines[row + 1]
    assert "  actor.path (str, default 'builtin:reverse-sft')" in lines


@pytest.mark.parametrize("exp", sorted(FOLLOWERS))
def test_followers_take_the_actor_path_and_tokenizer(exp):
    cfg = apply_overrides(
        EXPERIMENTS.get(exp), ["actor.path=/ckpt/my-sft", "actor.tokenizer_path=/ckpt/tok"]
    )
    resolved = cfg.with_role_defaults()
    roles = resolved.roles()
    for role in FOLLOWERS[exp]:
        assert getattr(cfg, role).path == SAME_AS_ACTOR  # the config keeps what the user wrote
        assert roles[role].config.path == "/ckpt/my-sft"
        assert roles[role].config.tokenizer_path == "/ckpt/tok"
        assert roles[role].config.init_from_actor == (roles[role].head != "lm")
    # A role the user points elsewhere keeps its own path.
    other = apply_overrides(EXPERIMENTS.get(exp), ["actor.path=/a", "ref.path=/r"])
    assert other.with_role_defaults().ref.path == "/r"


def test_reward_model_path_never_follows_the_actor():
    cfg = apply_overrides(EXPERIMENTS.get("ppo"), ["actor.path=/a", "reward.scorers=[model]"])
    assert cfg.roles()["rew"].head == "reward"
    assert cfg.with_role_defaults().rew.path == ""  # refused by the preflight check
    weightless = apply_overrides(EXPERIMENTS.get("ppo"), ["actor.path=/a"]).with_role_defaults()
    assert (weightless.rew.path, weightless.rew.tokenizer_path) == ("", "/a")
    rw = EXPERIMENTS.get("rw")().with_role_defaults()
    assert rw.rew.path == "builtin:reverse-sft"  # rw trains the reward model from a checkpoint


def test_builtin_resolution_applies_the_defaults():
    from realflow.system.builtin_models import resolve_builtin_models

    cfg = apply_overrides(EXPERIMENTS.get("ppo"), ["actor.path=builtin:tiny"])
    resolved = resolve_builtin_models(cfg)
    assert resolved.ref.path == resolved.critic.path == "builtin:tiny"
    assert resolved.rew.tokenizer_path == "builtin"


def test_dry_run_shows_the_default(capsys):
    from realflow.quickstart import main

    assert main(["ppo", "--dry-run", "actor.path=/ckpt/my-sft"]) == 0
    out = capsys.readouterr().out
    assert "actor:\n  path: /ckpt/my-sft\n" in out
    assert "ref:\n  path: ''\n" in out and "critic:\n  path: ''\n" in out
