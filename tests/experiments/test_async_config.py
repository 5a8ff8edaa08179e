"""The `async.*` keys of the critic-free experiments: typed as `async.max_staleness` (a Python
keyword, declared under `async_`), the graph they compile to, and the config errors."""

from __future__ import annotations

import pytest
import yaml

from realflow.api.config import ConfigError, apply_overrides, describe_fields, to_dict
from realflow.api.registry import EXPERIMENTS

CRITIC_FREE = ["grpo", "rloo", "reinforce_pp", "dapo"]


def problems_of(exp: str, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        apply_overrides(EXPERIMENTS.get(exp), overrides)
    return e.value.problems


def test_the_key_is_async_on_the_command_line_in_presets_help_and_config_yaml(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"async": {"correction": "tis"}}))
    cfg = apply_overrides(
        EXPERIMENTS.get("grpo"),
        ["async.max_staleness=2", "async.separate_gen=true"],
        [str(preset)],
    )
    assert (cfg.async_.max_staleness, cfg.async_.correction) == (2, "tis")
    assert to_dict(cfg)["async"]["max_staleness"] == 2
    assert "async_" not in to_dict(cfg)
    text = describe_fields(EXPERIMENTS.get("grpo"))
    assert "  async.max_staleness (int, default 0)" in text.splitlines()
    assert "async_" not in text
    # A typo gets the closest key, with the name users type.
    assert problems_of("grpo", "async.max_stalenes=1") == [
        "async.max_stalenes: unknown key; did you mean 'async.max_staleness'?"
    ]


@pytest.mark.parametrize("exp", CRITIC_FREE)
def test_staleness_without_a_separate_gen_worker_is_refused(exp):
    problems = problems_of(exp, "async.max_staleness=1")
    assert any(
        p.startswith("async.max_staleness (1) > 0") and "set async.separate_gen=true" in p
        for p in problems
    ), problems


def test_gen_and_actor_on_one_worker_is_refused():
    problems = problems_of(
        "grpo",
        "async.max_staleness=1",
        "async.separate_gen=true",
        "allocation={actor: 0, gen: 0, rew: 1, ref: 2}",
    )
    assert problems == [
        "allocation puts gen and actor on worker 0, but async.separate_gen=true generates on its "
        "own worker: give allocation.gen another index"
    ]


def test_tis_needs_a_cap():
    problems = problems_of(
        "grpo", "async.max_staleness=1", "async.separate_gen=true", "async.correction=tis",
        "async.is_cap=0",
    )  # fmt: skip
    assert problems == ["async.is_cap (0) must be > 0 with correction=tis (the truncation level)"]


@pytest.mark.parametrize("exp", CRITIC_FREE)
def test_the_graph_of_asynchronous_rollouts(exp):
    """separate_gen: actor_gen runs on role gen (the actor's config); decoupled adds
    actor_prox on the actor, read by actor_train; tis and k=0 add nothing."""
    cls = EXPERIMENTS.get(exp)
    plain = apply_overrides(cls).dfg()
    cfg = apply_overrides(cls, ["async.max_staleness=1", "async.separate_gen=true"])
    dfg = cfg.dfg()
    by_name = {m.name: m for m in dfg.mfcs}
    assert by_name["actor_gen"].model_name == "gen"
    assert cfg.roles()["gen"].config is cfg.actor
    assert cfg.weight_copies() == {"gen": "actor"} and cfg.max_staleness() == 1
    assert by_name["actor_prox"].model_name == "actor"
    assert by_name["actor_prox"].output_keys == ("prox_logprobs",)
    assert "prox_logprobs" in by_name["actor_train"].input_keys
    assert by_name["actor_train"].interface_impl.args["correction"] == "decoupled"
    assert [m.name for m in dfg.mfcs if m.name != "actor_prox"] == [m.name for m in plain.mfcs]
    tis = apply_overrides(
        cls, ["async.max_staleness=1", "async.separate_gen=true", "async.correction=tis"]
    ).dfg()
    assert [m.name for m in tis.mfcs] == [m.name for m in plain.mfcs]
    k0 = apply_overrides(cls, ["async.separate_gen=true"])
    assert [m.name for m in k0.dfg().mfcs] == [m.name for m in plain.mfcs]
    assert "correction" not in k0.dfg().mfcs[-1].interface_impl.args  # on-policy: plain loss
