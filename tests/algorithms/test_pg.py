"""RLOO, REINFORCE++, DAPO and Dr. GRPO math against plain loops written from the papers' formulas
(scalar Python, explicit branches), on random packed batches."""

from __future__ import annotations

import math

import pytest
import torch
from alg_testutils import Packed, packed_batches, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from realflow.algorithms.pg import (
    batch_scaled_advantages,
    discounted_returns,
    groups_with_distinct_scores,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_kl,
)
from realflow.algorithms.ppo import LOSS_TYPES, aggregate_loss, policy_loss

sizes_lists = st.lists(st.integers(2, 6), min_size=1, max_size=5)


def groups(values: list[float], sizes: list[int]) -> list[list[float]]:
    out, s = [], 0
    for n in sizes:
        out.append(values[s : s + n])
        s += n
    return out


# ---- baselines ----------------------------------------------------------------------------------


@given(sizes_lists, st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_rloo_baseline_is_the_mean_of_the_other_answers(sizes, seed):
    scores = randn(sum(sizes), seed)
    want = []
    for g in groups(scores.tolist(), sizes):
        for i, r in enumerate(g):
            others = [x for j, x in enumerate(g) if j != i]
            want.append(r - sum(others) / len(others))
    torch.testing.assert_close(
        rloo_advantages(scores, sizes), torch.tensor(want, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "fn", [rloo_advantages, batch_scaled_advantages, groups_with_distinct_scores]
)
def test_group_sizes_must_sum_to_the_batch(fn):
    with pytest.raises(ValueError, match=r"sum to len\(scores_B\) \(5\), got \[2, 2\]$"):
        fn(torch.zeros(5), [2, 2])


def test_rloo_needs_two_answers_per_prompt():
    with pytest.raises(ValueError, match=r"group_sizes must be >= 2"):
        rloo_advantages(torch.zeros(3), [2, 1])


@given(st.lists(st.integers(1, 5), min_size=1, max_size=5), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_batch_scaled_advantages_match_loop(sizes, seed):
    scores = randn(sum(sizes), seed)
    xs = scores.tolist()
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    want = [x - sum(g) / len(g) for g in groups(xs, sizes) for x in g]
    want = [w / (std + 1e-6) for w in want]
    got = batch_scaled_advantages(scores, sizes, eps=1e-6)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def ref_batch_scaled(xs: list[float], sizes: list[int], eps: float) -> list[float]:
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return [(x - sum(g) / len(g)) / (std + eps) for g in groups(xs, sizes) for x in g]


def test_batch_scaled_advantages_default_eps_and_bf16_scores():
    """eps defaults to 1e-6 (a batch whose std is ~1e-6 shows it); bf16 scores are scaled by
    a float32 std, not a bf16 one."""
    tiny = torch.tensor([0.0, 2e-6], dtype=torch.float64)
    want = ref_batch_scaled(tiny.tolist(), [2], 1e-6)
    torch.testing.assert_close(batch_scaled_advantages(tiny, [2]), torch.tensor(want).double())
    xs = [1.0, 2.5, -0.75, 3.25, 0.5]  # exact in bf16
    got = batch_scaled_advantages(torch.tensor(xs).to(torch.bfloat16), [2, 3])
    want = ref_batch_scaled(xs, [2, 3], 1e-6)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_batch_scaled_advantages_of_one_part_take_the_whole_batch_std():
    """A data-parallel rank's part: centred within its own groups, scaled by the std of the
    whole batch's scores (`batch_scores_B`); the parts together equal the whole batch's."""
    xs, sizes = [1.0, 3.0, 2.0, 6.0, -1.0], [2, 3]
    whole = torch.tensor(xs, dtype=torch.float64)
    want = ref_batch_scaled(xs, sizes, 1e-6)
    first = batch_scaled_advantages(whole[:2], [2], batch_scores_B=whole)
    second = batch_scaled_advantages(whole[2:], [3], batch_scores_B=whole)
    torch.testing.assert_close(torch.cat([first, second]), torch.tensor(want).double())
    assert not torch.allclose(first, batch_scaled_advantages(whole[:2], [2]))


@given(st.lists(st.integers(1, 5), min_size=1, max_size=6), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_dynamic_sampling_keeps_groups_whose_scores_differ(sizes, seed):
    # Scores from a few values, so that groups of equal scores are common.
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (sum(sizes),), generator=g).float() / 2
    want = [len(set(grp)) > 1 for grp in groups(scores.tolist(), sizes)]
    assert groups_with_distinct_scores(scores, sizes).tolist() == want


def test_dynamic_sampling_compares_exactly():
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5 + 1e-7, 1.0, 1.0])
    assert groups_with_distinct_scores(scores, [2, 2, 2]).tolist() == [False, True, False]


# ---- reward shaping -----------------------------------------------------------------------------


def ref_overlong(n: int, l_max: int, l_cache: int) -> float:
    """DAPO eq. 13, written as in the paper."""
    if n <= l_max - l_cache:
        return 0.0
    if n <= l_max:
        return ((l_max - l_cache) - n) / l_cache
    return -1.0


@pytest.mark.parametrize("l_max,l_cache", [(16, 4), (16, 16), (8, 1)])
def test_overlong_penalty_matches_the_paper(l_max, l_cache):
    lens = torch.arange(0, l_max + 3)
    got = overlong_penalty(lens, l_max, l_cache, penalty_factor=0.5)
    want = [0.5 * ref_overlong(int(n), l_max, l_cache) for n in lens]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))
    assert float(got[l_max]) == pytest.approx(-0.5)  # the longest answer the generator allows


def test_overlong_penalty_default_factor_is_one():
    lens = torch.arange(0, 20)
    want = [ref_overlong(int(n), 16, 4) for n in lens]
    torch.testing.assert_close(overlong_penalty(lens, 16, 4), torch.tensor(want))


@pytest.mark.parametrize("buffer_len", [20, 0])
def test_overlong_penalty_rejects_a_bad_buffer(buffer_len):
    with pytest.raises(
        ValueError, match=rf"buffer_len \({buffer_len}\) must be in 1..max_answer_tokens \(16\)"
    ):
        overlong_penalty(torch.tensor([3]), 16, buffer_len)


@given(
    packed_batches(max_b=4, max_len=8), st.integers(0, 10_000), st.sampled_from(["k1", "k2", "k3"])
)
@settings(max_examples=30, deadline=None)
def test_sequence_kl_sums_the_estimate_over_answer_tokens(pk: Packed, seed, kind):
    lp, ref = randn(pk.t1, seed), randn(pk.t1, seed + 1)
    want = []
    for seq_lp, seq_ref, mask in zip(pk.split_t1(lp), pk.split_t1(ref), pk.mask_list()):
        total = 0.0
        for a, b, m in zip(seq_lp, seq_ref, mask):
            d = a - b  # log pi - log ref
            if m:
                total += {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d}[kind]
        want.append(total)
    got = sequence_kl(lp, ref, pk.mask(), pk.cu, kind)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


# Two sequences of 3 tokens (T1 positions [0, 2) and [2, 4)), position 0 a prompt position.
# k1 = lp - ref per position: 2.0 (masked out), 0.25, -1.0, 0.5.
HAND_LP = torch.tensor([-1.0, -0.5, -2.0, -0.25])
HAND_REF = torch.tensor([-3.0, -0.75, -1.0, -0.75])
HAND_MASK = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
HAND_CU = torch.tensor([0, 3, 6])


def test_sequence_kl_defaults_to_k1():
    """Without ``kind`` the estimate is k1 = log pi - log ref, summed over answer tokens; a float64
    mask is a weight in the log-probs' dtype (float32 out)."""
    got = sequence_kl(HAND_LP, HAND_REF, HAND_MASK, HAND_CU)
    torch.testing.assert_close(got, torch.tensor([0.25, -1.0 + 0.5]))  # checks the dtype too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reinforce_pp_defaults_are_k1_and_gamma_one(dtype):
    """Defaults: k1 token KL, undiscounted reward-to-go. Hand-computed with kl_coef 0.5 and scores
    (1, 2) at the last answer token of each sequence: token rewards 0.875 | 0.5, 1.75. bf16 inputs
    (exact here) are computed in float32."""
    score, lp, ref = (x.to(dtype) for x in (torch.tensor([1.0, 2.0]), HAND_LP, HAND_REF))
    adv, ret = reinforce_pp_advantages(score, lp, ref, HAND_MASK, HAND_CU, kl_coef=0.5)
    kept = [0.875, 0.5 + 1.75, 1.75]
    torch.testing.assert_close(ret, torch.tensor([0.0, *kept]))
    mean = sum(kept) / 3
    std = math.sqrt(sum((g - mean) ** 2 for g in kept) / 2 + 1e-8)
    torch.testing.assert_close(adv, torch.tensor([0.0] + [(g - mean) / std for g in kept]))


def ref_returns(rewards: list[float], mask: list[int], gamma: float) -> list[float]:
    out, running = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        if mask[t]:
            running = rewards[t] + gamma * running
            out[t] = running
    return out


@given(packed_batches(max_b=4, max_len=9), st.integers(0, 10_000), st.sampled_from([1.0, 0.9, 0.0]))
@settings(max_examples=40, deadline=None)
def test_discounted_returns_match_loop(pk: Packed, seed, gamma):
    r = randn(pk.t1, seed)
    want = [
        v
        for seq, mask in zip(pk.split_t1(r), pk.mask_list())
        for v in ref_returns(seq, mask, gamma)
    ]
    got = discounted_returns(r, pk.mask(), pk.cu, gamma)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_discounted_returns_default_gamma_is_one_and_gamma_is_checked():
    r, mask, cu = (
        torch.tensor([1.0, 2.0, 4.0]),
        torch.ones(3, dtype=torch.bool),
        torch.tensor([0, 4]),
    )
    assert discounted_returns(r, mask, cu).tolist() == [7.0, 6.0, 4.0]
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^gamma \({bad}\) must be in \[0, 1\]$"):
            discounted_returns(r, mask, cu, bad)


@given(packed_batches(max_b=5, max_len=9), st.integers(0, 10_000), st.sampled_from(["k1", "k2"]))
@settings(max_examples=40, deadline=None)
def test_reinforce_pp_advantages_match_the_paper(pk: Packed, seed, kind):
    """Token reward -beta * KL_t, plus the score at the last answer token; reward-to-go with
    gamma; whitened over every answer token of the batch (unbiased variance)."""
    beta, gamma = 0.1, 0.95
    lp, ref = randn(pk.t1, seed), randn(pk.t1, seed + 1)
    score = randn(len(pk.lens), seed + 2)
    returns, kept = [], []
    for i, (seq_lp, seq_ref, mask) in enumerate(
        zip(pk.split_t1(lp), pk.split_t1(ref), pk.mask_list())
    ):
        rewards = []
        last = max(t for t, m in enumerate(mask) if m)
        for t, (a, b) in enumerate(zip(seq_lp, seq_ref)):
            kl = (a - b) if kind == "k1" else (a - b) ** 2 / 2
            rewards.append(-beta * kl + (float(score[i]) if t == last else 0.0))
        seq_returns = ref_returns(rewards, mask, gamma)
        returns += seq_returns
        kept += [g for g, m in zip(seq_returns, mask) if m]
    mean = sum(kept) / len(kept)
    var = sum((g - mean) ** 2 for g in kept) / (len(kept) - 1) if len(kept) > 1 else 0.0
    flat_mask = [m for mask in pk.mask_list() for m in mask]
    want = [(g - mean) / math.sqrt(var + 1e-8) if m else 0.0 for g, m in zip(returns, flat_mask)]
    adv, ret = reinforce_pp_advantages(score, lp, ref, pk.mask(), pk.cu, beta, gamma, kind)
    torch.testing.assert_close(ret, torch.tensor(returns, dtype=torch.float64) * pk.mask())
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64))


def test_reinforce_pp_requires_answer_tokens():
    """A sequence without answer tokens has no token to carry its score: refused, by index (also
    when the previous sequence's only answer token is at T1 position 0)."""
    z, cu = torch.zeros(3), torch.tensor([0, 2, 4])  # T1 positions [0, 1) and [1, 3)
    mask = torch.tensor([True, False, False])
    with pytest.raises(ValueError, match="^sequence 1 has no answer tokens$"):
        reinforce_pp_advantages(torch.zeros(2), z, z, mask, cu, 0.1)


# ---- the loss -----------------------------------------------------------------------------------


def ref_clipped_pg(lp: torch.Tensor, old: float, a: float, low: float, high: float) -> torch.Tensor:
    r = torch.exp(lp - old)
    unclipped = -a * r
    clipped = -a * torch.clamp(r, 1 - low, 1 + high)
    return unclipped if float(unclipped.detach()) >= float(clipped.detach()) else clipped


@given(
    packed_batches(max_b=5, max_len=8),
    st.integers(0, 10_000),
    st.sampled_from(LOSS_TYPES),
    st.sampled_from([0.2, 0.28]),
    st.sampled_from([0.0, 0.05]),
)
@settings(max_examples=60, deadline=None)
def test_policy_loss_matches_loop(pk: Packed, seed, loss_type, high, beta):
    low, l_max = 0.2, 10
    old = randn(pk.t1, seed) - 1.0
    lp = (old + 0.3 * randn(pk.t1, seed + 1)).requires_grad_()
    adv, ref = randn(pk.t1, seed + 2), old + 0.2 * randn(pk.t1, seed + 3)
    loss, stats = policy_loss(
        lp,
        old,
        adv,
        pk.mask(),
        pk.cu,
        low,
        high,
        loss_type,
        l_max,
        ref_logprobs_T1=ref,
        kl_beta=beta,
    )
    loss.backward()

    leaf = lp.detach().clone().requires_grad_()
    per_seq, s = [], 0
    for n, mask in zip(pk.lens, pk.mask_list()):
        terms = []
        for t in range(n - 1):
            if mask[t]:
                pg = ref_clipped_pg(leaf[s + t], float(old[s + t]), float(adv[s + t]), low, high)
                d = float(ref[s + t]) - leaf[s + t]
                terms.append(pg + beta * (torch.exp(d) - d - 1))
        per_seq.append(terms)
        s += n - 1
    every = [x for terms in per_seq for x in terms]
    if loss_type == "dapo":  # token mean over the batch
        want = sum(every) / len(every)
    elif loss_type == "grpo":  # sequence mean of token means
        want = sum(sum(t) / len(t) for t in per_seq) / len(per_seq)
    else:  # dr_grpo: a constant normaliser, sequences x max answer tokens
        want = sum(every) / (len(per_seq) * l_max)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(lp.grad, leaf.grad)
    assert (stats.ref_kl is not None) and float(stats.ref_kl) >= 0.0


def test_clip_higher_lets_positive_advantages_raise_the_ratio_further():
    """With A > 0 the ratio is clipped at 1 + eps_high: a ratio of 1.25 still gets a gradient
    when eps_high = 0.28, and none with the symmetric 0.2."""
    old = torch.zeros(1)
    mask = torch.ones(1, dtype=torch.bool)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    grads = {}
    for high in (0.2, 0.28):
        lp = torch.tensor([math.log(1.25)], requires_grad=True)
        loss, stats = policy_loss(lp, old, torch.ones(1), mask, cu, 0.2, high)
        loss.backward()
        grads[high] = float(lp.grad)
    assert grads[0.2] == 0.0
    assert grads[0.28] == pytest.approx(-1.25)


def test_aggregate_loss_edge_cases():
    """grpo averages over the sequences that have answer tokens (hand values: sequence 1 has
    none); dr_grpo takes max_answer_tokens = 1 and refuses 0."""
    x, cu = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 3, 6])
    mask = torch.tensor([True, True, False, False])
    assert float(aggregate_loss(x, mask, cu, "grpo")) == 1.5  # only sequence 0: (1 + 2) / 2
    assert float(aggregate_loss(x, mask, cu, "dr_grpo", 1)) == 1.5  # (1 + 2) / (2 x 1)
    with pytest.raises(ValueError, match="needs max_answer_tokens > 0, got 0$"):
        aggregate_loss(x, mask, cu, "dr_grpo", 0)


def test_aggregate_loss_names_the_closest_loss_type():
    x, mask = torch.zeros(2), torch.ones(2, dtype=torch.bool)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="did you mean 'dr_grpo'"):
        aggregate_loss(x, mask, cu, "drgrpo")
    with pytest.raises(ValueError, match="^unknown loss_type 'zzz', known: grpo, dapo, dr_grpo$"):
        aggregate_loss(x, mask, cu, "zzz")
    with pytest.raises(ValueError, match="needs max_answer_tokens > 0"):
        aggregate_loss(x, mask, cu, "dr_grpo")
