"""Process (dense) rewards: a scorer that scores steps of an answer. The steps land on the
tokens that complete them, PPO pays each on its own token, GRPO counts them toward the
sequence's score, and the built-in `task_steps` decomposes the `task` score exactly."""

from __future__ import annotations

import random

import pytest
import torch
from iface_testutils import NO_LIMIT
from test_reward import text_sample

from realflow.api.data import SequenceSample
from realflow.api.interface import Model
from realflow.api.registry import INTERFACES, REWARD_SCORERS
from realflow.data import tasks


def reward_out(tokenizer, data, scorers, weights=(), args=None):
    iface = INTERFACES.get("reward")(scorers=list(scorers), weights=list(weights), args=args or {})
    return iface.inference(Model("rew", None, tokenizer), data, NO_LIMIT)


def _answer_token_ends(tokenizer, answer: str) -> list[int]:
    """Character ends of each answer token, decoding growing prefixes (the reference)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]


def test_task_steps_sum_to_the_task_score_and_sit_on_the_item_tokens(tokenizer):
    rng = random.Random(0)
    rows, meta = [], {"task": [], "answer": [], "prompt": []}
    for task in ("reverse", "sort", "copy", "add"):
        for ex in tasks.get_task(task).make_examples(6, seed=3):
            items = tasks.get_task(task).items(ex["answer"])
            guess = [i if rng.random() < 0.6 else str(rng.randint(0, 9)) for i in items]
            if rng.random() < 0.3:
                guess = guess[:-1] or guess
            text = tasks.get_task(task).format_items(guess)
            rows.append((ex["prompt"], text))
            for k in meta:
                meta[k].append(ex[k])
    data = text_sample(tokenizer, rows, metadata=meta)
    out = reward_out(tokenizer, data, ["task_steps"])
    assert out.data["rewards"].tolist() == [0.0] * len(rows)  # no sequence-level scorer
    dense = out.data["dense_rewards"].split([n - 1 for n in data.flat_seqlens("packed_input_ids")])
    for (prompt, answer), d, m_task, m_ans in zip(rows, dense, meta["task"], meta["answer"]):
        expected = tasks.score({"task": m_task, "answer": m_ans}, answer)
        assert float(d.sum()) == pytest.approx(expected, abs=1e-6)
        n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        paid = {int(i) - (n_prompt - 1) for i in d.nonzero().flatten()}  # answer token indices
        ends = _answer_token_ends(tokenizer, answer)
        item_ends = tasks.item_ends(tasks.get_task(m_task), answer)
        allowed = {min(k for k, e in enumerate(ends) if e >= end) for end in item_ends}
        assert paid <= allowed
        assert d[: n_prompt - 1].abs().sum() == 0  # nothing on prompt positions


class PerToken:
    """A dense scorer giving 0.1 * (position + 1) to each answer token."""

    needs_model = False
    dense = True
    args: dict = {}

    def score(self, batch, model):
        return [[0.1 * (j + 1) for j in range(len(ids))] for ids in batch.answer_ids]


@pytest.fixture
def per_token():
    REWARD_SCORERS.register("test_per_token")(PerToken)
    yield
    REWARD_SCORERS.unregister("test_per_token")


def test_per_token_scores_are_laid_out_like_logprobs(tokenizer, per_token):
    data = text_sample(tokenizer, [("rev 1 2 =", " 2 1"), ("sort 3 1 =", " 1")])
    out = reward_out(tokenizer, data, ["test_per_token"], weights=[2.0])
    assert out.seqlens["dense_rewards"] == [[n - 1] for n in data.flat_seqlens("packed_input_ids")]
    for i, (prompt, answer) in enumerate([("rev 1 2 =", " 2 1"), ("sort 3 1 =", " 1")]):
        n_prompt = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n_answer = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        row = out.data["dense_rewards"].split(
            [n - 1 for n in data.flat_seqlens("packed_input_ids")]
        )[i]
        expected = [0.0] * (n_prompt - 1) + [2 * 0.1 * (j + 1) for j in range(n_answer)] + [0.0]
        assert row.tolist() == pytest.approx(expected)  # the trailing EOS position gets 0


def _batch(dense_B4: list[list[float]] | None, scores: list[float]) -> SequenceSample:
    """Two sequences (prompt 2 tokens, answer 3), zero log-probs and values (see test_ppo)."""
    n = len(scores)
    seqs = {
        "packed_input_ids": [torch.arange(5)] * n,
        "prompt_mask": [torch.tensor([True, True, False, False, False])] * n,
        "logprobs": [torch.zeros(4)] * n,
        "ref_logprobs": [torch.zeros(4)] * n,
        "values": [torch.zeros(5)] * n,
        "rewards": [torch.tensor([s]) for s in scores],
        "no_eos_mask": [torch.tensor([False])] * n,
    }
    if dense_B4 is not None:
        seqs["dense_rewards"] = [torch.tensor(d) for d in dense_B4]
    return SequenceSample.from_sequences(list(range(n)), seqs)


def test_ppo_pays_each_step_on_its_own_token():
    """gamma = lambda = 1, zero values and KL: the return at answer position t is the sum of
    the rewards from t on. A dense step at the second answer token counts from there back."""
    from realflow.interfaces.ppo import PPOArgs, PPOReturns

    returns = PPOReturns(PPOArgs(reward_output_scaling=2.0))
    # T1 positions 1, 2, 3 are the answer; steps of 0.25 at positions 1 and 2.
    batch = returns.compute(_batch([[0, 0.25, 0.25, 0], [0, 0, 0, 0]], [1.0, 1.0]))
    assert batch.returns_T1.view(2, 4)[:, 1:].tolist() == [[3.0, 2.5, 2.0], [2.0, 2.0, 2.0]]
    assert batch.stats["reward/mean"] == pytest.approx((1.5 + 1.0) / 2)
    # All of a score on the last answer token as a dense step == the same sequence score.
    a = PPOReturns(PPOArgs()).compute(_batch([[0, 0, 0, 0.7], [0, 0, 0, 0.3]], [0.0, 0.0]))
    b = PPOReturns(PPOArgs()).compute(_batch(None, [0.7, 0.3]))
    assert torch.equal(a.advantages_T1, b.advantages_T1)
    assert torch.equal(a.returns_T1, b.returns_T1)


def test_grpo_counts_steps_toward_the_sequence_score(tokenizer):
    from realflow.interfaces.grpo import GRPOActorInterface

    iface = GRPOActorInterface(group_size=2)
    with_steps = _batch([[0, 0.5, 0.25, 0], [0, 0, 0, 0.1]], [0.0, 0.2])
    as_scores = _batch(None, [0.75, 0.3])
    for b in (with_steps, as_scores):  # one group of two sequences
        b.seqlens = {k: [sum(v, [])] for k, v in b.seqlens.items()}
        b.ids = [0]
    adv_a, stats_a = iface.advantages(with_steps)
    adv_b, stats_b = iface.advantages(as_scores)
    assert torch.equal(adv_a, adv_b)
