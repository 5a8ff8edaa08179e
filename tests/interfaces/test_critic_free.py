"""The critic-free actors (grpo_actor options, rloo_actor, reinforce_pp_actor) and the
group_filter interface, on hand-built batches: what each train step computes from the batch,
checked against plain per-sequence loops over its tensors."""

from __future__ import annotations

import math

import pytest
import torch
from iface_testutils import MB, NO_LIMIT, dataset_batch, rl_batch, train_model

from realflow.api.data import SequenceSample
from realflow.api.registry import INTERFACES


def make(impl: str, **changes):
    from realflow.api.registry import EXPERIMENTS
    from realflow.experiments.common import interface_args

    exp = {"grpo_actor": "grpo", "rloo_actor": "rloo", "reinforce_pp_actor": "reinforce_pp"}[impl]
    args = interface_args(EXPERIMENTS.get(exp)().hyperparameters())
    args["gen"]["max_new_tokens"] = 12
    args.update(changes)
    return INTERFACES.get(impl)(**args)


def per_seq(data: SequenceSample, key: str) -> list[list[float]]:
    """`key` cut into one list per sequence."""
    return [t.tolist() for t in data.data[key].split(data.flat_seqlens(key))]


def answer_masks(data: SequenceSample) -> list[list[bool]]:
    """Per sequence, in the L-1 log-prob space: True where the predicted token is an answer."""
    masks = [t.tolist() for t in data.data["prompt_mask"].split(data.flat_seqlens("prompt_mask"))]
    return [[not m for m in mask[1:]] for mask in masks]


def adv_per_seq(adv_T1: torch.Tensor, data: SequenceSample) -> list[float]:
    """The one advantage each sequence's answer tokens carry (checked to be one)."""
    out = []
    for a, m in zip(adv_T1.split(data.flat_seqlens("logprobs")), answer_masks(data)):
        on = a[torch.tensor(m)]
        assert torch.all(a[~torch.tensor(m)] == 0)
        assert torch.allclose(on, on[:1].expand_as(on))
        out.append(float(on[0]))
    return out


def groups(values: list[float], size: int) -> list[list[float]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


@pytest.mark.parametrize("estimator", ["k1", "k2"])
def test_rloo_advantages_with_kl_in_the_reward(tokenizer, estimator):
    beta, k = 0.1, 3
    rloo = make("rloo_actor", group_size=k, kl_beta=beta, kl_in_reward=True, kl_estimator=estimator)
    data = rl_batch(tokenizer, [k] * 4, rloo, seed=1)
    adv_T1, stats = rloo.advantages(data)
    scores = data.data["rewards"].tolist()
    shaped, kl_rewards = [], []
    for s, lp, ref, mask in zip(
        scores, per_seq(data, "logprobs"), per_seq(data, "ref_logprobs"), answer_masks(data)
    ):
        # k1 = log pi - log ref, k2 = (log pi - log ref)^2 / 2, summed over the answer
        per_token = [a - b if estimator == "k1" else (a - b) ** 2 / 2 for a, b in zip(lp, ref)]
        kl = sum(x for x, m in zip(per_token, mask) if m)
        shaped.append(s - beta * kl)
        kl_rewards.append(-beta * kl)
    want = []
    for g in groups(shaped, k):
        want += [r - (sum(g) - r) / (k - 1) for r in g]
    assert adv_per_seq(adv_T1, data) == pytest.approx(want, abs=1e-5)
    assert stats["reward/mean"] == pytest.approx(sum(scores) / len(scores))
    assert stats["kl_reward/mean"] == pytest.approx(sum(kl_rewards) / len(kl_rewards), abs=1e-6)
    assert stats["advantages/abs_mean"] == pytest.approx(sum(map(abs, want)) / len(want), abs=1e-5)


def test_rloo_needs_two_answers_per_prompt_to_train(tokenizer):
    rloo = make("rloo_actor", group_size=1)
    data = rl_batch(tokenizer, [1] * 4, rloo, seed=6)
    with pytest.raises(ValueError, match="group_sizes must be >= 2"):
        rloo.advantages(data)


@pytest.mark.parametrize("kl_in_reward", [True, False])
def test_rloo_puts_the_kl_in_the_reward_or_in_the_loss(tokenizer, kl_in_reward):
    """In the loss: loss = pg_loss + beta * ref_kl; in the reward: loss = pg_loss."""
    beta = 0.5
    rloo = make(
        "rloo_actor", group_size=3, kl_beta=beta, kl_in_reward=kl_in_reward, n_minibatches=1
    )
    data = rl_batch(tokenizer, [3] * 4, rloo, seed=2)
    stats = rloo.train_step(train_model(tokenizer), data, NO_LIMIT)
    assert stats["ref_kl"] > 0.01  # the actor and the ref differ (seeds 0 and 1)
    extra = stats["loss"] - stats["pg_loss"]
    assert extra == pytest.approx(0.0 if kl_in_reward else beta * stats["ref_kl"], abs=1e-5)
    assert ("kl_reward/mean" in stats) == kl_in_reward


KL_REF = {  # the estimators of KL(pi || ref) at one token, from its two log-probs
    "k1": lambda lp, ref: lp - ref,
    "k2": lambda lp, ref: (lp - ref) ** 2 / 2,
    "k3": lambda lp, ref: math.exp(ref - lp) - (ref - lp) - 1,
}


@pytest.mark.parametrize("kl_estimator, gamma", [("k1", 1.0), ("k2", 0.9), ("k3", 0.0)])
def test_reinforce_pp_advantages(tokenizer, kl_estimator, gamma):
    """Token rewards -beta * KL_t (the chosen estimator) plus the score at the last answer
    token, reward-to-go discounted by gamma, whitened over all answer tokens of the batch; the
    stats `returns/mean` (the un-whitened reward-to-go) and `kl` (k1, whatever the estimator)."""
    beta = 0.2
    rpp = make("reinforce_pp_actor", kl_beta=beta, kl_estimator=kl_estimator, gamma=gamma)
    data = rl_batch(tokenizer, [1] * 6, rpp, seed=3)
    adv_T1, stats = rpp.advantages(data)
    kl, returns, k1 = KL_REF[kl_estimator], [], []
    for s, lp, ref, mask in zip(
        data.data["rewards"].tolist(),
        per_seq(data, "logprobs"),
        per_seq(data, "ref_logprobs"),
        answer_masks(data),
    ):
        last = max(i for i, m in enumerate(mask) if m)
        r = [-beta * kl(a, b) + (s if i == last else 0.0) for i, (a, b) in enumerate(zip(lp, ref))]
        returns += [
            sum(gamma ** (j - i) * r[j] for j in range(i, len(r))) if m else None
            for i, m in enumerate(mask)
        ]
        k1 += [a - b for a, b, m in zip(lp, ref, mask) if m]
    on = [g for g in returns if g is not None]
    mean = sum(on) / len(on)
    std = math.sqrt(sum((g - mean) ** 2 for g in on) / (len(on) - 1))
    want = [0.0 if g is None else (g - mean) / std for g in returns]
    assert adv_T1.tolist() == pytest.approx(want, abs=1e-4)
    assert stats["returns/mean"] == pytest.approx(mean, abs=1e-5)
    assert stats["kl"] == pytest.approx(sum(k1) / len(k1), abs=1e-5)


def test_reinforce_pp_without_a_kl_term_needs_no_reference(tokenizer):
    """kl_beta = 0 (a graph without a ref model): no ref_logprobs are read, no `kl` stat, and
    the advantages are the whitened scores placed at every answer token (gamma 1)."""
    rpp = make("reinforce_pp_actor", kl_beta=0.0)
    data = rl_batch(tokenizer, [1] * 6, rpp, seed=4)
    keys = [k for k in data.keys if k != "ref_logprobs"]
    adv_T1, stats = rpp.advantages(data.select(keys))
    assert "kl" not in stats
    returns = [
        s if m else None
        for s, mask in zip(data.data["rewards"].tolist(), answer_masks(data))
        for m in mask
    ]
    on = [g for g in returns if g is not None]
    mean = sum(on) / len(on)
    std = math.sqrt(sum((g - mean) ** 2 for g in on) / (len(on) - 1))
    want = [0.0 if g is None else (g - mean) / std for g in returns]
    assert adv_T1.tolist() == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_scale_rewards(tokenizer, scale):
    k = 3
    grpo = make("grpo_actor", group_size=k, scale_rewards=scale)
    data = rl_batch(tokenizer, [k] * 4, grpo, seed=4)
    scores = data.data["rewards"].tolist()
    centred = [r - sum(g) / k for g in groups(scores, k) for r in g]

    def std(xs):
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    if scale == "group":
        want = [
            c / (std(g) + 1e-6) for c, g in zip(centred, [g for g in groups(scores, k) for _ in g])
        ]
    elif scale == "batch":
        want = [c / (std(scores) + 1e-6) for c in centred]
    else:
        want = centred
    adv_T1, _ = grpo.advantages(data)
    assert adv_per_seq(adv_T1, data) == pytest.approx(want, abs=1e-5)


def test_overlong_shaping_lowers_the_score_of_long_answers(tokenizer):
    """Answers of 1..12 tokens, max_new_tokens 12, buffer 4: answers over 8 tokens lose
    (n - 8) / 4 x 0.5 of their score."""
    grpo = make("grpo_actor", group_size=3, overlong_buffer_len=4, overlong_penalty_factor=0.5)
    data = rl_batch(tokenizer, [3] * 4, grpo, seed=5)
    shaped, stats = grpo.scores(data)
    lens = [sum(m) for m in answer_masks(data)]
    assert max(lens) > 8 >= min(lens)  # the batch has answers on both sides
    want = [s - 0.5 * max(0, n - 8) / 4 for s, n in zip(data.data["rewards"].tolist(), lens)]
    assert shaped.tolist() == pytest.approx(want, abs=1e-6)
    assert stats["overlong_penalty/mean"] < 0


def test_generate_stamps_the_policy_version_and_train_reports_the_lag(tokenizer):
    grpo = make("grpo_actor", group_size=2, n_minibatches=1, kl_beta=0.0)
    actor = train_model(tokenizer)
    actor.version = 3
    out = grpo.generate(actor, dataset_batch("prompt", tokenizer, 2), MB)
    assert out.metadata["policy_version"] == [3, 3]
    rewards = [[torch.tensor([float(j)]) for j in range(2)] for _ in range(2)]
    out.update_(SequenceSample.from_sequences(out.ids, {"rewards": rewards}))
    assert grpo.train_step(actor, out, MB)["policy_lag/max"] == 0.0
    actor.version = 5  # two train steps after the samples were generated
    assert grpo.train_step(actor, out, MB)["policy_lag/max"] == 2.0
    out.metadata["policy_version"] = [4, 2]  # samples of two versions (asynchronous rollouts)
    stats = grpo.train_step(actor, out, MB)
    assert (stats["staleness/mean"], stats["staleness/max"]) == (2.0, 3.0)  # 5 - 4, 5 - 2


@pytest.mark.parametrize("correction", ["decoupled", "tis"])
def test_stale_samples_train_with_the_correction(tokenizer, correction):
    """A train step on samples from older weights reports the correction's importance weight;
    decoupled refuses a batch without prox_logprobs (no actor_prox call in the graph)."""
    grpo = make("grpo_actor", group_size=2, n_minibatches=1, kl_beta=0.0, correction=correction,
                is_cap=2.0)  # fmt: skip
    actor = train_model(tokenizer)
    out = grpo.generate(actor, dataset_batch("prompt", tokenizer, 2), MB)
    rewards = [[torch.tensor([float(j)]) for j in range(2)] for _ in range(2)]
    out.update_(SequenceSample.from_sequences(out.ids, {"rewards": rewards}))
    if correction == "decoupled":
        with pytest.raises(ValueError, match="needs prox_logprobs"):
            grpo.train_step(actor, out, MB)
        out.update_(grpo.inference(actor, out, MB).remap_keys({"logprobs": "prox_logprobs"}))
    stats = grpo.train_step(actor, out, MB)
    # The samples are the current weights' own: every importance weight is 1, nothing capped.
    assert stats["is_weight/mean"] == pytest.approx(1.0, abs=1e-3)
    assert stats["is_capped_frac"] == 0.0


def test_group_filter_keeps_groups_whose_scores_differ():
    scores = [[1.0, 1.0, 1.0], [0.0, 0.5, 0.0], [0.25, 0.25, 0.25], [0.0, 0.0, 1.0]]
    data = SequenceSample.from_sequences(
        [10, 11, 12, 13], {"rewards": [[torch.tensor([v]) for v in g] for g in scores]}
    )
    f = INTERFACES.get("group_filter")()
    out = f.inference(None, data, NO_LIMIT)
    assert out.ids == [11, 13]
    assert out.data["rewards"].tolist() == [0.0, 0.5, 0.0, 0.0, 0.0, 1.0]
    none = f.inference(None, data.index([0, 2]), NO_LIMIT)
    assert none.ids == []


@pytest.mark.parametrize(
    "impl, changes, message",
    [
        ("rloo_actor", {"kl_estimator": "k4"}, r"rloo kl_estimator 'k4' unknown"),
        ("grpo_actor", {"loss_type": "bnpo"}, r"loss_type 'bnpo' unknown; known: grpo, dapo, dr_grpo"),
        ("grpo_actor", {"scale_rewards": "std"}, r"scale_rewards 'std' unknown; known: group, batch, none$"),
        ("grpo_actor", {"overlong_buffer_len": 13}, r"overlong_buffer_len \(13\) must be <= gen.max_new_tokens \(12\)"),
        ("reinforce_pp_actor", {"gamma": 2.0}, r"reinforce_pp gamma \(2.0\) must be in \[0, 1\]"),
        ("reinforce_pp_actor", {"gamma": -0.5}, r"reinforce_pp gamma \(-0.5\) must be in \[0, 1\]"),
        ("reinforce_pp_actor", {"kl_estimator": "k4"}, r"reinforce_pp kl_estimator 'k4' unknown; known: \['k1', 'k2', 'k3'\]$"),
    ],
)  # fmt: skip
def test_bad_arguments_say_what_is_wrong(impl, changes, message):
    with pytest.raises(ValueError, match=message):
        make(impl, **changes)
