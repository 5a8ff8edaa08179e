"""'did you mean' for unknown keys of a real experiment config (issue 8: `actor.lr`)."""

from __future__ import annotations

import pytest

from realflow.api.config import ConfigError, apply_overrides, closest_key, leaf_paths
from realflow.experiments.ppo import PPOConfig

PPO_KEYS = list(leaf_paths(PPOConfig))


@pytest.mark.parametrize(
    "key, expected",
    [
        # the leaf name exists under the section the user named: it wins over similar siblings
        ("actor.lr", "actor.optimizer.lr"),  # used to suggest 'actor.path'
        ("critic.lr", "critic.optimizer.lr"),
        ("critic.weight_decay", "critic.optimizer.weight_decay"),
        ("ppo.temperature", "ppo.gen.temperature"),
        ("gen.max_new_tokens", "ppo.gen.max_new_tokens"),
        # no section: the first role in the config's order
        ("lr", "actor.optimizer.lr"),
        ("optimizer.lr", "actor.optimizer.lr"),
        # misspelled leaves still go to the closest sibling
        ("actor.optimizer.lrr", "actor.optimizer.lr"),
        ("actor.bff16", "actor.bf16"),
        ("ppo.kl_ctll", "ppo.kl_ctl"),
        ("dataset.skip_bad_row", "dataset.skip_bad_rows"),
    ],
)
def test_suggestion_for_a_real_config(key, expected):
    assert key not in PPO_KEYS and expected in PPO_KEYS
    assert closest_key(key, PPO_KEYS) == expected


def test_actor_lr_on_the_command_line():
    with pytest.raises(ConfigError) as info:
        apply_overrides(PPOConfig, ["actor.lr=1e-5"])
    assert info.value.problems == ["actor.lr: unknown key; did you mean 'actor.optimizer.lr'?"]


def test_same_leaf_prefers_the_named_sections_in_order():
    valid = ["a.x.lr", "b.x.lr", "b.y.lr", "b.path"]
    assert closest_key("b.lr", valid) == "b.x.lr"
    assert closest_key("b.q.y.lr", ["a.y.lr", "b.x.lr", "b.z.y.lr"]) == "b.z.y.lr"
    assert closest_key("x.b.lr", ["b.x.lr", "x.b.y.lr"]) == "x.b.y.lr"  # sections in order
    assert closest_key("c.lr", valid) == "a.x.lr"
