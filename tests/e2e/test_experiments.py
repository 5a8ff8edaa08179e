"""Every built-in experiment end to end on a tiny config in local mode: finite metrics, one row
per step, one trace event per call (per round in a sampling loop), trained weights that moved
and load in `transformers`; an
SFT checkpoint as PPO's starting point; learning signal in tiny budgets; PPO in Ray mode."""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch
from e2e_utils import (
    assert_finite_rows,
    assert_one_trace_event_per_call,
    changed,
    initial_state,
    read_metrics,
    saved_state,
    tiny_config,
    trace_calls,
)

from realflow.system.runner import run

pytestmark = pytest.mark.timeout(600)

# experiment -> (the stat every row must have, {trained role: head})
EXPERIMENTS = {
    "sft": ("loss", {"actor": "lm"}),
    "rw": ("loss", {"rew": "reward"}),
    "dpo": ("loss", {"actor": "lm"}),
    "ppo": ("reward/mean", {"actor": "lm", "critic": "critic"}),
    "grpo": ("reward/mean", {"actor": "lm"}),
    "rloo": ("reward/mean", {"actor": "lm"}),
    "reinforce_pp": ("reward/mean", {"actor": "lm"}),
    "dapo": ("reward/mean", {"actor": "lm"}),
}
HF_CLASSES = {
    "lm": "AutoModelForCausalLM",
    "critic": "AutoModelForTokenClassification",
    "reward": "AutoModelForSequenceClassification",
}
STEPS = 3


def check_hf_loads(hf_dir: str, head: str) -> None:
    """`transformers` loads the directory with the head's Auto class; for an LM its logits equal
    realflow's on a packed batch of two sequences."""
    import transformers

    from realflow.models.hf_io import load_hf

    hf = getattr(transformers, HF_CLASSES[head]).from_pretrained(hf_dir, local_files_only=True)
    hf.eval()
    if head != "lm":
        return
    ours = load_hf(hf_dir, head="lm", load_tokenizer=False).model.eval()
    seqs = [torch.tensor([1, 5, 6, 7, 8]), torch.tensor([1, 9, 10])]
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(torch.cat(seqs), cu)
        for s, a, b in zip(seqs, cu[:-1].tolist(), cu[1:].tolist()):
            ref = hf(input_ids=s[None]).logits[0]
            torch.testing.assert_close(packed[a:b], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("exp", list(EXPERIMENTS))
def test_experiment_end_to_end(exp, tmp_path, reverse_sft):
    stat, trained = EXPERIMENTS[exp]
    cfg = tiny_config(exp, tmp_path / exp, f"total_steps={STEPS}")
    result = run(exp, cfg)

    # metrics: one row per step, the experiment's key stat in each, nothing NaN or inf
    rows = read_metrics(result.output_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["step"] for r in result.rows] == list(range(1, STEPS + 1))
    assert all(stat in r for r in rows), sorted(rows[0])
    assert_finite_rows(rows)

    # trace: each MFC ran once per step; those of a sampling loop once per round
    dfg = cfg.dfg()
    if dfg.filter is None:
        assert_one_trace_event_per_call(result.output_dir, [m.name for m in dfg.mfcs], STEPS)
    else:
        rounds = [int(r[f"{dfg.filter.name}/rounds"]) for r in rows]
        want = collections.Counter(
            (m.name, step)
            for step, n in zip(range(1, STEPS + 1), rounds)
            for m in dfg.mfcs
            for _ in range(n if m.name in dfg.loop else 1)
        )
        assert collections.Counter(trace_calls(result.output_dir)) == want

    # checkpoint: the trained roles (only they) saved as HF directories, with weights that moved
    ckpt = result.last_checkpoint
    assert ckpt is not None and os.path.basename(ckpt) == f"step_{STEPS}"
    saved_roles = {d for d in os.listdir(ckpt) if os.path.isdir(os.path.join(ckpt, d))}
    assert saved_roles == set(trained)
    for role, head in trained.items():
        before, after = initial_state(cfg, role), saved_state(os.path.join(ckpt, role), head)
        moved = changed(before, after)
        assert moved, f"{exp}: {role} weights did not change"
        assert all(torch.isfinite(v).all() for v in after.values())
        check_hf_loads(os.path.join(ckpt, role), head)


def test_sft_checkpoint_starts_ppo(tmp_path):
    """A checkpoint of the sft experiment is a valid actor, critic (value head initialised
    fresh) and ref for ppo."""
    sft = run(
        "sft", tiny_config("sft", tmp_path / "sft", "total_steps=2", "actor.path=builtin:tiny")
    )
    actor_dir = os.path.join(sft.last_checkpoint, "actor")
    cfg = tiny_config(
        "ppo",
        tmp_path / "ppo",
        "total_steps=2",
        f"actor.path={actor_dir}",
        f"critic.path={actor_dir}",
        f"ref.path={actor_dir}",
    )
    result = run("ppo", cfg)
    assert [r["step"] for r in result.rows] == [1, 2]
    assert all("reward/mean" in r for r in result.rows)
    assert_finite_rows(result.rows)
    assert result.rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # actor == ref before training

    sft_weights = saved_state(actor_dir, "lm")
    assert changed(sft_weights, saved_state(os.path.join(result.last_checkpoint, "actor"), "lm"))
    critic_start = initial_state(cfg, "critic")
    body = [k for k in critic_start if k in sft_weights]
    assert set(critic_start) - set(body) == {"score.weight", "score.bias"}  # fresh value head
    assert not changed({k: sft_weights[k] for k in body}, {k: critic_start[k] for k in body})
    critic = saved_state(os.path.join(result.last_checkpoint, "critic"), "critic")
    assert changed(critic_start, critic)
    with open(os.path.join(result.output_dir, "config.yaml")) as f:
        assert actor_dir in f.read()


# ---- learning signal ----------------------------------------------------------------------------


def test_sft_loss_goes_down(tmp_path):
    """From random init, 6 steps of 8 rows: the answer NLL falls well below its start."""
    result = run(
        "sft", tiny_config("sft", tmp_path, "total_steps=6", "n_seqs=8", "actor.path=builtin:tiny")
    )
    losses = [r["loss"] for r in result.rows]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses


def test_dpo_learns_the_pairs_it_trains_on(tmp_path, reverse_sft):
    """DPO on 8 built-in reverse pairs (one batch, seen every step): before the first update the
    implicit rewards tie (accuracy 0); after it the chosen answer wins on most pairs and the loss
    keeps falling."""
    from realflow.data.sources import builtin_rows

    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for _, row in builtin_rows("builtin:reverse", paired=True, n_rows=8):
            f.write(json.dumps(row) + "\n")
    cfg = tiny_config("dpo", tmp_path / "run", "total_steps=5", "n_seqs=8", f"dataset.path={data}")
    rows = run("dpo", cfg).rows
    acc, loss = [r["reward_acc"] for r in rows], [r["loss"] for r in rows]
    assert acc[0] == 0.0 and loss[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == ref
    assert min(acc[1:]) >= 0.75, acc
    assert loss[-1] < loss[1] < loss[0], loss


# ---- Ray -----------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_ppo_ray_mode(tmp_path, reverse_sft):
    """mode=ray: four worker actors in a local cluster started and stopped by the run."""
    pytest.importorskip("ray")
    cfg = tiny_config("ppo", tmp_path, "total_steps=2", "mode=ray")
    result = run("ppo", cfg)
    rows = read_metrics(result.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all("reward/mean" in r for r in rows)
    assert_finite_rows(rows)
    assert_one_trace_event_per_call(result.output_dir, [m.name for m in cfg.dfg().mfcs], 2)
    for role, head in (("actor", "lm"), ("critic", "critic")):
        hf_dir = os.path.join(result.last_checkpoint, role)
        assert changed(initial_state(cfg, role), saved_state(hf_dir, head))
        check_hf_loads(hf_dir, head)


@pytest.mark.ray
@pytest.mark.slow
def test_dapo_sampling_loop_ray_mode(tmp_path, reverse_sft):
    """mode=ray: the sampling loop's refills and the sends between actor and reward workers."""
    pytest.importorskip("ray")
    cfg = tiny_config("dapo", tmp_path, "total_steps=2", "mode=ray", "dapo.max_rounds=3")
    result = run("dapo", cfg)
    rows = read_metrics(result.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert_finite_rows(rows)
    rounds = [int(r["dyn_filter/rounds"]) for r in rows]
    calls = collections.Counter(trace_calls(result.output_dir))
    for step, n in enumerate(rounds, start=1):
        assert calls[("actor_gen", step)] == calls[("dyn_filter", step)] == n
        assert calls[("actor_train", step)] == 1
