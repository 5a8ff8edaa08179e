"""The custom-experiment examples in experiments/: each runs through the CLI with plugins=[...],
and their new pieces (the MiniLM reward interface, ReMax's greedy branch and advantages) do what
they say on hand-made batches."""

from __future__ import annotations

import json
import os

import pytest
import torch
from e2e_utils import (
    PPO_MINILM,
    QUIET,
    REMAX,
    assert_finite_rows,
    assert_one_trace_event_per_call,
    check_cli,
    read_metrics,
    run_cli,
    tiny_config,
)

from realflow.api.config import ConfigError
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model
from realflow.api.registry import INTERFACES

pytestmark = pytest.mark.timeout(600)

TINY_PPO = ("total_steps=2", "n_seqs=4", "ppo.gen.max_new_tokens=8", "dataset.max_length=64")
TINY_REMAX = ("total_steps=2", "n_seqs=4", "remax.gen.max_new_tokens=8", "dataset.max_length=64")


def prompt_answer_sample(rows: list[tuple[str, str, str]]) -> SequenceSample:
    """packed_input_ids + prompt_mask of (prompt, answer) texts in the built-in tokenizer, with
    the reference answer of each row as metadata `answer` (and task 'reverse')."""
    from realflow.data.tokenizer import load_tokenizer, prompt_token_ids, text_token_ids

    tok = load_tokenizer("builtin")
    ids, masks = [], []
    for prompt, answer, _ in rows:
        p, a = prompt_token_ids(tok, prompt), text_token_ids(tok, answer)
        ids.append(torch.tensor(p + a))
        masks.append(torch.tensor([True] * len(p) + [False] * len(a)))
    return SequenceSample.from_sequences(
        list(range(len(rows))),
        {"packed_input_ids": ids, "prompt_mask": masks},
        metadata={"answer": [r[2] for r in rows], "task": ["reverse"] * len(rows)},
    )


# ---- (a) ppo_minilm -----------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_minilm_cli(tmp_path, reverse_sft):
    out = tmp_path / "run"
    check_cli(
        run_cli("ppo_minilm", f"plugins=[{PPO_MINILM}]", *TINY_PPO, *QUIET, f"output_dir={out}")
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert_finite_rows(rows)
    assert all(-1.0 <= r["reward/mean"] <= 1.0 for r in rows)  # a cosine similarity
    assert_one_trace_event_per_call(
        out, ["actor_gen", "rew_inf", "ref_inf", "critic_inf", "actor_train", "critic_train"], 2
    )
    ckpt = out / "checkpoints" / "step_2"
    assert sorted(d for d in os.listdir(ckpt) if (ckpt / d).is_dir()) == ["actor", "critic"]
    dfg = json.loads((out / "dfg.json").read_text())
    rew = next(n for n in dfg["nodes"] if n["name"] == "rew_inf")
    assert rew["interface_impl"]["type_"] == "minilm_reward"


def test_ppo_minilm_config(examples_loaded):
    from realflow.api.config import describe_fields
    from realflow.api.registry import EXPERIMENTS

    keys = describe_fields(EXPERIMENTS.get("ppo_minilm"))  # what --help lists
    assert "minilm.weight" in keys and "minilm.task_weight" in keys and "ppo.kl_ctl" in keys
    cfg = tiny_config("ppo_minilm", "unused", "minilm.weight=2.0", "minilm.task_weight=0.5")
    assert cfg.roles()["rew"].head == "none"  # no reward model is loaded
    rew = cfg.dfg().mfc("rew_inf")
    assert rew.interface_impl.type_ == "minilm_reward"
    assert rew.interface_impl.args == {"model_path": "", "weight": 2.0, "task_weight": 0.5}
    with pytest.raises(ConfigError) as e:
        tiny_config("ppo_minilm", "unused", "reward.scorers=[model]", "minilm.model_path=/nope")
    assert len(e.value.problems) == 2
    assert any("reward.* is unused" in p for p in e.value.problems)
    assert any("minilm.model_path" in p and "/nope" in p for p in e.value.problems)


def test_minilm_reward_scores_similarity_to_the_reference(examples_loaded):
    from realflow.data.tokenizer import load_tokenizer

    rows = [
        ("rev 1 2 3 =", " 3 2 1", " 3 2 1"),  # the reference itself: cosine 1
        ("rev 1 2 3 =", " 9", " 3 2 1"),
        ("rev 4 5 =", " 5 4", " 5 4"),
    ]
    data = prompt_answer_sample(rows)
    model = Model("rew", None, tokenizer=load_tokenizer("builtin"))
    mb = MicroBatchSpec()
    cls = INTERFACES.get("minilm_reward")
    sim = cls().inference(model, data, mb).data["rewards"]
    assert sim.shape == (3,) and sim.dtype == torch.float32
    assert sim[0] == pytest.approx(1.0, abs=1e-5) and sim[2] == pytest.approx(1.0, abs=1e-5)
    assert sim[1] < 0.99

    mixed = cls(weight=2.0, task_weight=0.5).inference(model, data, mb).data["rewards"]
    task = INTERFACES.get("reward")(["task"]).inference(model, data, mb).data["rewards"]
    assert task[0] == 1.0 and task[1] < 1.0
    torch.testing.assert_close(mixed, 2.0 * sim + 0.5 * task)


# ---- (b) remax ----------------------------------------------------------------------------------


def test_remax_dry_run_shows_the_greedy_branch():
    proc = run_cli("remax", f"plugins=[{REMAX}]", "--dry-run", "--json")
    dfg = json.loads(check_cli(proc))["dfg"]
    nodes = {n["name"]: n for n in dfg["nodes"]}
    assert list(nodes) == [
        "actor_gen",
        "actor_greedy_gen",
        "rew_inf",
        "greedy_rew_inf",
        "ref_inf",
        "actor_train",
    ]
    assert {n["model_name"] for n in nodes.values()} == {"actor", "rew", "ref"}  # no critic
    assert nodes["actor_greedy_gen"]["interface_impl"]["args"]["gen"]["greedy"] is True
    assert nodes["actor_gen"]["interface_impl"]["args"]["gen"]["greedy"] is False
    edges = {(e["src"], e["dst"]): e["keys"] for e in dfg["edges"]}
    assert edges[("actor_greedy_gen", "greedy_rew_inf")] == [
        "greedy_input_ids",
        "greedy_prompt_mask",
    ]
    assert edges[("greedy_rew_inf", "actor_train")] == ["greedy_rewards"]
    assert edges[("rew_inf", "actor_train")] == ["rewards"]

    text = check_cli(run_cli("remax", f"plugins=[{REMAX}]", "--dry-run"))
    assert "actor_greedy_gen -> greedy_rew_inf  (greedy_input_ids, greedy_prompt_mask)" in text


@pytest.mark.slow
def test_remax_cli(tmp_path, reverse_sft):
    out = tmp_path / "run"
    check_cli(run_cli("remax", f"plugins=[{REMAX}]", *TINY_REMAX, *QUIET, f"output_dir={out}"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert_finite_rows(rows)
    for r in rows:
        assert r["advantages/mean"] == pytest.approx(r["reward/mean"] - r["reward/greedy_mean"])
    mfcs = ["actor_gen", "actor_greedy_gen", "rew_inf", "greedy_rew_inf", "ref_inf", "actor_train"]
    assert_one_trace_event_per_call(out, mfcs, 2)
    assert os.path.isfile(out / "checkpoints" / "step_2" / "actor" / "config.json")


def test_remax_greedy_baseline_is_the_greedy_answer(tmp_path, reverse_sft, examples_loaded):
    """In a run, greedy_rewards are the task scores of the actor's greedy answers: with a greedy
    sampled branch too (a config the experiment refuses, so built here by hand) both branches
    give the same answers and every advantage is exactly 0, so only the KL term trains."""
    from realflow.system.runner import run

    cfg = tiny_config("remax", tmp_path, *TINY_REMAX)
    cfg.remax.gen.greedy = True  # bypasses validation on purpose
    rows = run("remax", cfg).rows
    assert len(rows) == 2
    for r in rows:
        assert r["reward/mean"] == r["reward/greedy_mean"]
        assert r["advantages/abs_mean"] == 0.0 and r["pg_loss"] == 0.0


def test_remax_advantages_are_sample_minus_greedy(examples_loaded):
    rows = [("rev 1 2 =", " 2 1", " 2 1"), ("rev 3 4 5 =", " 5 4 3 9", " 5 4 3")]
    data = prompt_answer_sample(rows)
    extra = SequenceSample.from_sequences(
        data.ids,
        {
            "rewards": [torch.tensor([1.0]), torch.tensor([0.25])],
            "greedy_rewards": [torch.tensor([0.5]), torch.tensor([1.0])],
            "no_eos_mask": [torch.tensor([False]), torch.tensor([False])],
            "greedy_no_eos_mask": [torch.tensor([False]), torch.tensor([True])],
        },
    )
    data.update_(extra)
    iface = INTERFACES.get("remax_actor")()
    adv_T1, stats = iface.advantages(data)
    # T1 layout: L-1 positions per sequence; position t predicts token t+1
    masks = data.data["prompt_mask"].split(data.flat_seqlens("prompt_mask"))
    expected = torch.cat([(~m[1:]).float() * a for m, a in zip(masks, [0.5, -0.75])])
    assert (expected != 0).sum() == 2 + 4  # answer tokens " 2 1" and " 5 4 3 9"
    torch.testing.assert_close(adv_T1, expected)
    assert stats["reward/greedy_mean"] == 0.75 and stats["advantages/mean"] == -0.125

    # an answer without EOS scores 0 on either branch when mask_no_eos_with_zero
    masked = INTERFACES.get("remax_actor")(mask_no_eos_with_zero=True)
    adv_T1, _ = masked.advantages(data)
    assert adv_T1[-1] == pytest.approx(0.25)  # 0.25 - 0


def test_remax_refuses_a_greedy_sampled_branch(examples_loaded):
    with pytest.raises(ConfigError, match="remax.gen.greedy"):
        tiny_config("remax", "unused", "remax.gen.greedy=true")
    with pytest.raises(ConfigError, match=r"remax.n_minibatches \(3\) must divide n_seqs \(4\)"):
        tiny_config("remax", "unused", "n_seqs=4", "remax.n_minibatches=3")
