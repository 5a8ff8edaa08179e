"""ppo_actor / ppo_critic: rollout layout, logprob consistency, and a full train step."""

from __future__ import annotations

import math

import pytest
import torch
from iface_testutils import MB, changed, copy_params, dataset_batch, inference_model, train_model

from realflow.algorithms import gae_packed, kl_shaped_rewards, split_critic_values
from realflow.api.data import SequenceSample
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import answer_mask_T1

GEN = dict(max_new_tokens=8, min_new_tokens=0, greedy=False, temperature=1.0, top_k=0, top_p=1.0)


def ppo_args(**changes):
    """The keyword arguments the ppo experiment passes (PPOHyperparameters as a dict)."""
    from realflow.experiments.common import interface_args
    from realflow.experiments.ppo import PPOHyperparameters

    args = interface_args(PPOHyperparameters())
    args["gen"] = dict(GEN)
    for k, v in changes.items():
        if k == "gen":
            args["gen"].update(v)
        else:
            args[k] = v
    return args


def rollout(tokenizer, n=4, seed=0, **changes):
    actor = train_model(tokenizer, lr=1e-3)
    iface = INTERFACES.get("ppo_actor")(**ppo_args(**changes))
    prompts = dataset_batch("prompt", tokenizer, n)
    torch.manual_seed(seed)
    return actor, iface, prompts, iface.generate(actor, prompts, MB)


@pytest.mark.parametrize(
    "gen",
    [
        dict(greedy=True),
        dict(greedy=True, temperature=0.7),
        dict(temperature=1.0),
        dict(temperature=0.7),
    ],
)
def test_generate_layout_and_logprobs_match_inference(tokenizer, gen):
    actor, iface, prompts, out = rollout(tokenizer, n=5, gen=gen)
    assert out.ids == prompts.ids
    assert out.keys == {"packed_input_ids", "prompt_mask", "logprobs", "no_eos_mask"}
    assert out.metadata["answer"] == prompts.metadata["answer"]
    lens = out.seqlens["packed_input_ids"]
    assert out.seqlens["prompt_mask"] == lens
    assert out.seqlens["logprobs"] == [[n - 1] for [n] in lens]
    assert out.seqlens["no_eos_mask"] == [[1]] * 5
    assert out.data["no_eos_mask"].dtype == torch.bool
    assert out.data["prompt_mask"].dtype == torch.bool
    eos = tokenizer.eos_token_id
    cu = out.cu_seqlens("packed_input_ids").tolist()
    pcu = prompts.cu_seqlens("packed_prompts").tolist()
    for i in range(5):
        ids = out.data["packed_input_ids"][cu[i] : cu[i + 1]]
        mask = out.data["prompt_mask"][cu[i] : cu[i + 1]]
        prompt = prompts.data["packed_prompts"][pcu[i] : pcu[i + 1]]
        n_prompt = len(prompt)
        assert torch.equal(ids[:n_prompt], prompt) and bool(mask[:n_prompt].all())
        answer = ids[n_prompt:]
        assert 1 <= len(answer) <= GEN["max_new_tokens"] and not bool(mask[n_prompt:].any())
        ended = bool(answer[-1] == eos)
        assert bool(out.data["no_eos_mask"][i]) == (not ended)
        assert not bool((answer[:-1] == eos).any())
    # Sampling log-probs equal the inference log-probs on the answer tokens, 0 on the prompt.
    inf = iface.inference(actor, out.select(["packed_input_ids"]), MB)
    amask = answer_mask_T1(out.data["prompt_mask"], out.cu_seqlens("packed_input_ids"))
    gen_lp = out.data["logprobs"]
    assert torch.all(gen_lp[~amask] == 0)
    torch.testing.assert_close(gen_lp[amask], inf.data["logprobs"][amask], atol=1e-4, rtol=0)


def test_generate_with_top_k_stores_unfiltered_logprobs(tokenizer):
    actor, iface, _, out = rollout(tokenizer, n=3, gen=dict(top_k=5, min_new_tokens=2))
    inf = iface.inference(actor, out.select(["packed_input_ids"]), MB)
    amask = answer_mask_T1(out.data["prompt_mask"], out.cu_seqlens("packed_input_ids"))
    torch.testing.assert_close(out.data["logprobs"][amask], inf.data["logprobs"][amask])
    n_answer = (~out.data["prompt_mask"]).long().split(out.flat_seqlens("prompt_mask"))
    assert all(int(n.sum()) >= 2 for n in n_answer)  # min_new_tokens


def ppo_train_batch(tokenizer, actor, iface, out, scores):
    """The train inputs of an iteration: the rollout plus ref logprobs, values and rewards."""
    ref = inference_model(tokenizer, seed=1)
    critic_model = train_model(tokenizer, head="critic", seed=2, name="critic")
    critic = INTERFACES.get("ppo_critic")(**ppo_args())
    data = out.select(out.keys)
    ids_only = out.select(["packed_input_ids"])
    data.update_(iface.inference(ref, ids_only, MB).remap_keys({"logprobs": "ref_logprobs"}))
    values = critic.inference(critic_model, ids_only, MB)
    assert values.seqlens["values"] == out.seqlens["packed_input_ids"]
    data.update_(values)
    data.update_(out.__class__.from_sequences(out.ids, {"rewards": list(scores[:, None])}))
    return data, critic, critic_model


def test_actor_and_critic_train_step(tokenizer):
    actor, iface, _, out = rollout(tokenizer, n=4, seed=3)
    scores = torch.tensor([1.0, 0.0, 0.5, 0.25])
    data, critic, critic_model = ppo_train_batch(tokenizer, actor, iface, out, scores)
    actor_before = copy_params(actor.module.module)
    critic_before = copy_params(critic_model.module.module)
    a_stats = iface.train_step(actor, data, MB)
    c_stats = critic.train_step(critic_model, data, MB)
    for stats in (a_stats, c_stats):
        assert all(math.isfinite(v) for v in stats.values()), stats
        assert stats["n_skipped_minibatches"] == 0
    assert a_stats["reward/mean"] == pytest.approx(float(scores.mean()))
    for key in ("loss", "kl", "kl_coef", "clip_frac", "importance_ratio", "approx_kl", "grad_norm"):
        assert key in a_stats
    # The first minibatch runs at the behaviour policy: its ratio is 1 (on average over both).
    assert 0.9 < a_stats["importance_ratio"] < 1.1
    assert a_stats["kl_coef"] == pytest.approx(0.05)
    assert "value_clip_frac" in c_stats
    assert changed(actor_before, actor.module.module)
    assert changed(critic_before, critic_model.module.module)


def test_returns_match_algorithms(tokenizer):
    """The returns the critic trains on are GAE over the KL-shaped rewards (plain composition)."""
    actor, iface, _, out = rollout(tokenizer, n=3, seed=4)
    scores = torch.tensor([2.0, -1.0, 0.5])
    data, critic, _ = ppo_train_batch(tokenizer, actor, iface, out, scores)
    batch = critic.returns.compute(data)
    cu = data.cu_seqlens("packed_input_ids")
    mask = answer_mask_T1(data.data["prompt_mask"], cu)
    no_eos = data.data["no_eos_mask"]
    rewards = kl_shaped_rewards(
        scores, data.data["logprobs"], data.data["ref_logprobs"], mask, cu, 0.05, no_eos,
        reward_clip=5.0,
    )  # fmt: skip
    values, boot = split_critic_values(data.data["values"], cu, no_eos)
    adv, ret = gae_packed(rewards, values, cu, boot, 1.0, 1.0, mask)
    torch.testing.assert_close(batch.returns_T1, ret)
    torch.testing.assert_close(batch.advantages_T1, adv)


def test_adaptive_kl_state_round_trip(tokenizer):
    actor, iface, _, out = rollout(tokenizer, n=2, seed=5, adaptive_kl_ctl=True, value_norm=True)
    data, _, _ = ppo_train_batch(tokenizer, actor, iface, out, torch.tensor([1.0, 0.0]))
    iface.train_step(actor, data, MB)
    state = iface.state_dict()
    assert state["kl_ctl"]["value"] != pytest.approx(0.05, abs=0)
    fresh = INTERFACES.get("ppo_actor")(**ppo_args(adaptive_kl_ctl=True, value_norm=True))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


def test_early_stop_skips_minibatches(tokenizer):
    actor, iface, _, out = rollout(tokenizer, n=4, seed=6, early_stop_imp_ratio=1e-6)
    data, _, _ = ppo_train_batch(tokenizer, actor, iface, out, torch.ones(4))
    before = copy_params(actor.module.module)
    stats = iface.train_step(actor, data, MB)
    assert stats["n_skipped_minibatches"] == 2
    assert not changed(before, actor.module.module)


def test_unknown_argument_is_an_error():
    with pytest.raises(ValueError, match="kl_ctrl.*did you mean 'kl_ctl'"):
        INTERFACES.get("ppo_actor")(**ppo_args(kl_ctrl=0.1))


def synthetic_batch(no_eos, scores):
    """Two sequences (prompt 2 tokens, answer 3) with zero log-probs and values."""
    n = len(scores)
    return SequenceSample.from_sequences(
        list(range(n)),
        {
            "packed_input_ids": [torch.arange(5)] * n,
            "prompt_mask": [torch.tensor([True, True, False, False, False])] * n,
            "logprobs": [torch.zeros(4)] * n,
            "ref_logprobs": [torch.zeros(4)] * n,
            "values": [torch.zeros(5)] * n,
            "rewards": [torch.tensor([s]) for s in scores],
            "no_eos_mask": [torch.tensor([b]) for b in no_eos],
        },
    )


@pytest.mark.parametrize(
    "changes,expected",
    [
        (dict(), [3.0, 1.0]),
        (dict(no_eos_penalty=-1.0), [2.0, 1.0]),
        (dict(mask_no_eos_with_zero=True), [0.0, 1.0]),
        (dict(reward_output_bias=1.0, reward_output_scaling=2.0), [4.0, 0.0]),
        (dict(max_reward_clip=2.0), [2.0, 1.0]),
    ],
)
def test_score_processing_arguments(changes, expected):
    from realflow.interfaces.ppo import PPOArgs, PPOReturns

    returns = PPOReturns(PPOArgs(**changes))
    batch = returns.compute(synthetic_batch([True, False], [3.0, 1.0]))
    # Zero values, zero KL, gamma = lambda = 1: every answer position's return is the score.
    assert batch.returns_T1.view(2, 4)[:, 1:].tolist() == [[e] * 3 for e in expected]
    assert batch.stats["reward/mean"] == 2.0


# Known categorical distributions of the answer tokens: pi samples them, ref scores them.
PI = [0.6, 0.25, 0.1, 0.05]
REF = [0.25, 0.25, 0.25, 0.25]
PROMPT_REF_LOGP = -1.7  # ref log-prob on prompt positions: must stay out of the KL


def kl_batch(n_seqs: int, seed: int = 0):
    """`n_seqs` sequences (prompt 3 tokens, answer 1..6 tokens drawn from PI) with the keys
    PPOReturns reads, and per sequence the answer tokens' (log pi, log ref) as Python floats."""
    g = torch.Generator().manual_seed(seed)
    pi, ref = torch.tensor(PI).log(), torch.tensor(REF).log()
    seqs = {k: [] for k in ("packed_input_ids", "prompt_mask", "logprobs", "ref_logprobs")}
    pairs = []
    for _ in range(n_seqs):
        n_answer = int(torch.randint(1, 7, (), generator=g))
        x = torch.multinomial(torch.tensor(PI), n_answer, replacement=True, generator=g)
        seqs["packed_input_ids"].append(torch.cat([torch.tensor([7, 8, 9]), x]))
        seqs["prompt_mask"].append(torch.tensor([True] * 3 + [False] * n_answer))
        seqs["logprobs"].append(torch.cat([torch.zeros(2), pi[x]]))
        seqs["ref_logprobs"].append(torch.cat([torch.full((2,), PROMPT_REF_LOGP), ref[x]]))
        pairs.append([(float(pi[t]), float(ref[t])) for t in x])
    n = n_seqs
    seqs["values"] = [torch.zeros(len(ids)) for ids in seqs["packed_input_ids"]]
    seqs["rewards"] = [torch.tensor([1.0])] * n
    seqs["no_eos_mask"] = [torch.tensor([False])] * n
    return SequenceSample.from_sequences(list(range(n)), seqs), pairs


def test_kl_stat_and_kl_rewards_are_kl_pi_to_ref():
    """PPO's `kl` stat is the mean over sequences of sum_t (log pi - log ref) over answer tokens:
    a sample estimate of the sequence KL(pi || ref) (positive), and each sequence's KL reward
    is -kl_coef times its own term."""
    from realflow.interfaces.ppo import PPOArgs, PPOReturns

    data, pairs = kl_batch(512)
    coef = 0.05
    batch = PPOReturns(PPOArgs(kl_ctl=coef, max_reward_clip=10.0)).compute(data)
    kl_B = [sum(lp - rp for lp, rp in seq) for seq in pairs]
    want = sum(kl_B) / len(kl_B)
    assert batch.stats["kl"] == pytest.approx(want, rel=1e-5)
    assert batch.stats["kl_reward/mean"] == pytest.approx(-coef * want, rel=1e-5)
    # Against the exact KL: E[kl_B] = E[answer length] * KL(PI || REF) = 3.5 * KL.
    exact = sum(p * math.log(p / q) for p, q in zip(PI, REF))
    se = torch.tensor(kl_B).std().item() / math.sqrt(len(kl_B))
    assert abs(want - 3.5 * exact) < 5 * se and want > 0
    # gamma = lambda = 1, zero values: the return at the first answer position is the whole
    # sequence's reward, score 1 plus the KL rewards.
    first = data.cu_seqlens("packed_input_ids")[:-1] - torch.arange(len(pairs)) + 2
    got = batch.returns_T1[first.long()]
    torch.testing.assert_close(got, torch.tensor([1.0 - coef * k for k in kl_B]))


@pytest.mark.parametrize("target_over_kl", [0.5, 0.95, 1.05, 2.0])
def test_adaptive_kl_coef_follows_the_observed_kl(target_over_kl):
    """The controller sees the batch's KL(pi || ref): it grows the coefficient when that KL is
    above the target and shrinks it when below, by Ziegler et al.'s formula."""
    from realflow.interfaces.ppo import PPOArgs, PPOReturns

    data, pairs = kl_batch(64, seed=1)
    kl = sum(sum(lp - rp for lp, rp in seq) for seq in pairs) / len(pairs)
    assert kl > 0
    args = PPOArgs(
        kl_ctl=0.1, adaptive_kl_ctl=True, adaptive_kl_target=target_over_kl * kl,
        adaptive_kl_horizon=500.0,
    )  # fmt: skip
    returns = PPOReturns(args)
    stats = returns.compute(data).stats
    assert stats["kl_coef"] == 0.1  # the coefficient this batch's rewards used
    err = min(max(1 / target_over_kl - 1, -0.2), 0.2)
    want = 0.1 * (1 + err * len(pairs) / 500.0)
    assert returns.kl_ctl.value == pytest.approx(want, rel=1e-5)
    assert (returns.kl_ctl.value > 0.1) == (target_over_kl < 1)


def sample_var(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def test_explained_variance_against_the_formula():
    """1 - Var(returns - values) / Var(returns) over the masked entries (unbiased variances);
    1 for values equal to the returns, nan for constant returns."""
    from realflow.interfaces.ppo import explained_variance

    values = torch.tensor([0.5, 9.0, 1.0, 2.0, -1.0])
    returns = torch.tensor([1.0, 7.0, 2.0, 0.0, 1.5])
    mask = torch.tensor([True, False, True, True, True])
    on = [(float(v), float(r)) for v, r, m in zip(values, returns, mask) if m]
    want = 1.0 - sample_var([r - v for v, r in on]) / sample_var([r for _, r in on])
    assert explained_variance(values, returns, mask) == pytest.approx(want, rel=1e-6)
    assert explained_variance(returns, returns, mask) == 1.0
    assert math.isnan(explained_variance(values, torch.full((5,), 2.0), mask))


def test_drop_last_token_keeps_the_first_l_minus_1_values_of_each_sequence():
    from realflow.interfaces.ppo import drop_last_token

    values_T = torch.arange(9, dtype=torch.float32)
    cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)  # sequences of 4, 2 and 3 tokens
    want = [float(values_T[t]) for a, b in [(0, 4), (4, 6), (6, 9)] for t in range(a, b - 1)]
    assert drop_last_token(values_T, cu).tolist() == want == [0.0, 1.0, 2.0, 4.0, 6.0, 7.0]


@pytest.mark.parametrize(
    "gen, temperature",
    [(dict(), 1.0), (dict(temperature=0.7), 0.7), (dict(greedy=True, temperature=0.7), 1.0),
     (dict(greedy=False, temperature=0.5), 0.5)],
)  # fmt: skip
def test_logprob_temperature(gen, temperature):
    from realflow.interfaces.ppo import PPOArgs

    assert PPOArgs(gen=gen).temperature == temperature


def test_unknown_generation_argument_is_an_error():
    from realflow.interfaces.ppo import PPOArgs

    with pytest.raises(ValueError, match=r"unknown generation arguments \['temp'\]; known: \["):
        PPOArgs(gen=dict(temp=0.7, top_k=3)).generation_config()
    assert PPOArgs(gen=dict(top_k=3)).generation_config().top_k == 3


def test_policy_loss_stats_names():
    from realflow.algorithms.ppo import PPOActorStats
    from realflow.interfaces.ppo import policy_loss_stats

    values = dict(pg_loss=1.0, approx_kl_k1=2.0, approx_kl_k2=3.0, approx_kl_k3=4.0,
                  clip_frac=5.0, dual_clip_frac=6.0, ratio_mean=7.0, ratio_max=8.0, n_tokens=9.0)  # fmt: skip
    stats = PPOActorStats(**{k: torch.tensor(v) for k, v in values.items()})
    assert policy_loss_stats(stats) == {
        "pg_loss": 1.0, "clip_frac": 5.0, "importance_ratio": 7.0, "importance_ratio_max": 8.0,
        "approx_kl": 4.0,
    }  # fmt: skip


def test_dp_whitening_uses_the_whole_batch_of_every_rank(monkeypatch):
    """With a data-parallel group each rank whitens its part with the mean and variance of the
    answer tokens of every rank: its entries of the whitened whole batch. dp_cat (the
    all_gather) is replaced by the concatenation two ranks would gather."""
    import realflow.interfaces.dp_stats as dp_stats

    x = [torch.tensor([3.0, 100.0, -1.0]), torch.tensor([2.0, 0.5, 7.0, -50.0])]
    masks = [torch.tensor([True, False, True]), torch.tensor([True, True, True, False])]
    on = [float(v) for xr, mr in zip(x, masks) for v, m in zip(xr, mr) if m]
    mean, std = sum(on) / len(on), math.sqrt(sample_var(on) + 1e-8)
    for rank in (0, 1):

        def gather(t, group, rank=rank):
            if group is None:
                return None
            every = [xr[mr] for xr, mr in zip(x, masks)]
            assert torch.equal(t, every[rank])
            return torch.cat(every), sum(len(e) for e in every[:rank])

        monkeypatch.setattr(dp_stats, "dp_cat", gather)
        want = [(float(v) - mean) / std if m else 0.0 for v, m in zip(x[rank], masks[rank])]
        got = dp_stats.dp_masked_whiten(x[rank], masks[rank], "dp")
        assert got.tolist() == pytest.approx(want, rel=1e-5)
        assert dp_stats.dp_all(x[rank][masks[rank]], "dp").tolist() == on


def test_value_norm_keeps_the_return_statistics_and_denormalises_the_critic():
    """value_norm: the critic's values are in the units of the running mean and (population)
    variance of every answer token's return so far; without it there are no statistics."""
    from realflow.interfaces.ppo import PPOArgs, PPOReturns

    returns = PPOReturns(PPOArgs(value_norm=True))
    returns.compute(synthetic_batch([False, False], [3.0, 1.0]))
    # Returns 3, 3, 3 and 1, 1, 1 on the answer tokens: mean 2, population variance 1.
    assert returns.state_dict()["value_rms"] == {"mean": 2.0, "var": 1.0, "count": 6, "eps": 1e-5}
    batch = returns.compute(synthetic_batch([False, False], [3.0, 1.0]))
    # The critic's 0 is now the running mean 2: advantages are score - 2 (gamma = lambda = 1).
    assert batch.stats["values/mean"] == pytest.approx(2.0)
    assert batch.advantages_T1.view(2, 4)[:, 1:].tolist() == [[1.0] * 3, [-1.0] * 3]
    assert "value_rms" not in PPOReturns(PPOArgs()).state_dict()
