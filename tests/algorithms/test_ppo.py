import math

import pytest
import torch
from alg_testutils import Packed, packed_batches, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from realflow.algorithms import (
    broadcast_to_tokens,
    group_normalized_advantages,
    grpo_loss,
    policy_loss,
    ppo_actor_loss,
    ppo_critic_loss,
    should_skip_minibatch,
)


def ref_token_pg(
    lp: torch.Tensor, old: float, a: float, eps: float, dual: float | None
) -> torch.Tensor:
    """Clipped surrogate of one token, built from scalar ops with explicit branches."""
    r = torch.exp(lp - old)
    unclipped = -a * r
    clipped = -a * torch.clamp(r, 1 - eps, 1 + eps)
    loss = unclipped if float(unclipped.detach()) >= float(clipped.detach()) else clipped
    if dual is not None and a < 0 and -a * dual < float(loss.detach()):
        loss = torch.tensor(-a * dual, dtype=lp.dtype)
    return loss


def make_policy_batch(pk: Packed, seed: int):
    old = randn(pk.t1, seed) - 1.0
    lp = (old + 0.3 * randn(pk.t1, seed + 1)).requires_grad_()
    adv = randn(pk.t1, seed + 2)
    return lp, old, adv


@given(
    packed_batches(max_b=4, max_len=8), st.integers(0, 10_000), st.sampled_from([None, 2.0, 3.0])
)
@settings(max_examples=40, deadline=None)
def test_ppo_actor_loss_value_grad_and_stats_match_loop(pk: Packed, seed: int, dual):
    eps = 0.2
    lp, old, adv = make_policy_batch(pk, seed)
    ent = randn(pk.t1, seed + 3).abs()
    mask = pk.mask()
    loss, stats = ppo_actor_loss(
        lp, old, adv, mask, eps, dual_clip=dual, entropy_T1=ent, entropy_coef=0.01
    )
    loss.backward()
    got_grad = lp.grad.clone()

    leaf = lp.detach().clone().requires_grad_()
    terms, n_clip, k1, k3, ratios, ents = [], 0, 0.0, 0.0, [], 0.0
    for t in range(pk.t1):
        if not mask[t]:
            continue
        o, a = float(old[t]), float(adv[t])
        terms.append(ref_token_pg(leaf[t], o, a, eps, dual))
        r = math.exp(float(lp.detach()[t]) - o)
        n_clip += (-a * min(max(r, 1 - eps), 1 + eps)) > (-a * r)
        k1 += o - float(lp.detach()[t])
        k3 += r - 1 - math.log(r)
        ratios.append(r)
        ents += float(ent[t])
    n = len(terms)
    want = sum(terms) / n - 0.01 * ents / n
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(got_grad, leaf.grad)
    assert float(stats.clip_frac) == pytest.approx(n_clip / n)
    assert float(stats.approx_kl_k1) == pytest.approx(k1 / n)
    assert float(stats.approx_kl_k3) == pytest.approx(k3 / n)
    assert float(stats.ratio_mean) == pytest.approx(sum(ratios) / n)
    assert float(stats.ratio_max) == pytest.approx(max(ratios))
    assert float(stats.entropy) == pytest.approx(ents / n)
    assert int(stats.n_tokens) == n


def test_dual_clip_caps_negative_advantage_loss():
    lp = torch.tensor([math.log(10.0)])
    old = torch.tensor([0.0])
    adv = torch.tensor([-1.0])
    mask = torch.ones(1, dtype=torch.bool)
    plain, _ = ppo_actor_loss(lp, old, adv, mask, 0.2)
    capped, stats = ppo_actor_loss(lp, old, adv, mask, 0.2, dual_clip=3.0)
    assert float(plain) == pytest.approx(10.0)
    assert float(capped) == pytest.approx(3.0)
    assert float(stats.dual_clip_frac) == 1.0
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_actor_loss(lp, old, adv, mask, 0.2, dual_clip=1.0)
    for bad in (0.0, -0.2):
        with pytest.raises(ValueError, match=rf"^eps_clip must be > 0, got {bad}$"):
            ppo_actor_loss(lp, old, adv, mask, bad)


def test_should_skip_minibatch():
    lp = torch.tensor([0.0, 1.0])
    old = torch.zeros(2)
    mask = torch.ones(2, dtype=torch.bool)
    _, stats = ppo_actor_loss(lp, old, torch.ones(2), mask, 0.2)
    assert not should_skip_minibatch(stats)
    assert should_skip_minibatch(stats, max_ratio_mean=1.5)  # mean ratio (1 + e) / 2 ~ 1.86
    assert not should_skip_minibatch(stats, max_ratio_mean=2.0)
    k3 = (math.e - 1 - 1) / 2
    assert should_skip_minibatch(stats, max_approx_kl=k3 - 1e-3)
    assert not should_skip_minibatch(stats, max_approx_kl=k3 + 1e-3)
    # At the threshold exactly nothing is skipped: the rule is "more than".
    _, still = ppo_actor_loss(old, old, torch.ones(2), mask, 0.2)  # ratio 1, k3 0 exactly
    assert float(still.ratio_mean) == 1.0 and float(still.approx_kl_k3) == 0.0
    assert not should_skip_minibatch(still, max_ratio_mean=1.0, max_approx_kl=0.0)


@given(packed_batches(max_b=4, max_len=8), st.integers(0, 10_000), st.sampled_from([None, 0.2]))
@settings(max_examples=40, deadline=None)
def test_ppo_critic_loss_matches_loop(pk: Packed, seed: int, clip):
    old = randn(pk.t1, seed)
    v = (old + 0.5 * randn(pk.t1, seed + 1)).requires_grad_()
    ret = randn(pk.t1, seed + 2)
    mask = pk.mask()
    loss, stats = ppo_critic_loss(v, old, ret, mask, clip)
    loss.backward()

    leaf = v.detach().clone().requires_grad_()
    terms, n_clip = [], 0
    for t in range(pk.t1):
        if not mask[t]:
            continue
        o, r = float(old[t]), float(ret[t])
        err = (leaf[t] - r) ** 2
        if clip is not None:
            vc = o + torch.clamp(leaf[t] - o, -clip, clip)
            err_c = (vc - r) ** 2
            if float(err_c.detach()) > float(err.detach()):
                err, n_clip = err_c, n_clip + 1
        terms.append(err)
    want = 0.5 * sum(terms) / len(terms)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(v.grad, leaf.grad)
    assert float(stats.clip_frac) == pytest.approx(n_clip / len(terms))


def test_ppo_critic_loss_stats_and_clip_bound():
    """value_loss is the loss; value_mean and returns_mean are means over the mask (hand values:
    squared errors 1 and 16 on the two answer tokens); value_eps_clip must be > 0."""
    v, ret = torch.tensor([1.0, 2.0, 5.0]), torch.tensor([0.0, 3.0, 1.0])
    mask = torch.tensor([True, False, True])
    loss, stats = ppo_critic_loss(v, v.clone(), ret, mask)
    assert float(loss) == 4.25 and float(stats.value_loss) == 4.25  # 0.5 * (1 + 16) / 2
    assert float(stats.value_mean) == 3.0 and float(stats.returns_mean) == 0.5
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match=rf"^value_eps_clip must be > 0, got {bad}$"):
            ppo_critic_loss(v, v.clone(), ret, mask, bad)


def test_ppo_actor_loss_entropy_term():
    """Entropy given without a coefficient is reported, not added; a coefficient without entropy
    adds nothing. pg: the mean of the two unclipped surrogates (ratios e^0.1 and e^-0.2 are
    inside [0.8, 1.2]); the entropy mean is 2.5."""
    lp, old, adv = torch.tensor([0.1, -0.2]), torch.zeros(2), torch.tensor([1.0, -1.0])
    mask, ent = torch.ones(2, dtype=torch.bool), torch.tensor([2.0, 3.0])
    pg = (-math.exp(0.1) + math.exp(-0.2)) / 2
    loss, stats = ppo_actor_loss(lp, old, adv, mask, 0.2, entropy_T1=ent)
    assert float(loss) == pytest.approx(pg, rel=1e-6) and float(stats.entropy) == 2.5
    assert float(stats.pg_loss) == pytest.approx(pg, rel=1e-6)
    assert float(stats.approx_kl_k2) == pytest.approx((0.1**2 + 0.2**2) / 4, rel=1e-5)
    loss, _ = ppo_actor_loss(lp, old, adv, mask, 0.2, entropy_T1=ent, entropy_coef=1.0)
    assert float(loss) == pytest.approx(pg - 2.5, rel=1e-6)
    loss, stats = ppo_actor_loss(lp, old, adv, mask, 0.2, entropy_coef=1.0)
    assert float(loss) == pytest.approx(pg, rel=1e-6) and stats.entropy is None


def test_policy_loss_reports_the_ref_kl_but_adds_it_only_with_kl_beta():
    """kl_beta defaults to 0: with ref log-probs the k3 KL is reported, the loss is the plain
    surrogate mean (same tokens as above, one sequence; ref log-probs 0, so d = -lp)."""
    lp, old, adv = torch.tensor([0.1, -0.2]), torch.zeros(2), torch.tensor([1.0, -1.0])
    mask, cu, ref = torch.ones(2, dtype=torch.bool), torch.tensor([0, 3]), torch.zeros(2)
    pg = (-math.exp(0.1) + math.exp(-0.2)) / 2
    k3 = sum(math.exp(-x) + x - 1 for x in (0.1, -0.2)) / 2
    loss, stats = policy_loss(lp, old, adv, mask, cu, 0.2, ref_logprobs_T1=ref)
    assert float(loss) == pytest.approx(pg, rel=1e-6)
    assert float(stats.ref_kl) == pytest.approx(k3, rel=1e-5)


def test_ppo_actor_loss_of_no_tokens():
    """An empty micro-batch: loss 0 and ratio_max 0, not an error (max of an empty tensor)."""
    z = torch.zeros(0)
    loss, stats = ppo_actor_loss(z, z, z, torch.zeros(0, dtype=torch.bool), 0.2)
    assert float(loss) == 0.0 and float(stats.ratio_max) == 0.0 and int(stats.n_tokens) == 0


def test_ppo_actor_loss_clip_higher():
    """A ratio of 1.25 with A = 1: clipped at 1.2 by eps_clip 0.2, not by eps_clip_high 0.28."""
    lp, zero, one = torch.tensor([math.log(1.25)]), torch.zeros(1), torch.ones(1)
    mask = torch.ones(1, dtype=torch.bool)
    symmetric, _ = ppo_actor_loss(lp, zero, one, mask, 0.2)
    higher, _ = ppo_actor_loss(lp, zero, one, mask, 0.2, eps_clip_high=0.28)
    assert float(symmetric) == pytest.approx(-1.2) and float(higher) == pytest.approx(-1.25)


def ref_group_adv(
    scores: list[float], sizes: list[int], scale: bool, eps: float, unbiased: bool = True
) -> list[float]:
    out, s = [], 0
    for n in sizes:
        g = scores[s : s + n]
        mean = sum(g) / n
        ss = sum((x - mean) ** 2 for x in g)
        std = math.sqrt(ss / (n - 1 if unbiased else n)) if n > 1 else 0.0
        out += [(x - mean) / (std + eps) if scale else x - mean for x in g]
        s += n
    return out


@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 1000), st.booleans())
@settings(max_examples=40, deadline=None)
def test_group_normalized_advantages_match_loop(sizes, seed, scale):
    scores = randn(sum(sizes), seed)
    got = group_normalized_advantages(scores, sizes, scale_by_std=scale, eps=1e-6)
    want = ref_group_adv(scores.tolist(), sizes, scale, 1e-6)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 1000))
@settings(max_examples=20, deadline=None)
def test_group_normalized_advantages_population_std(sizes, seed):
    scores = randn(sum(sizes), seed)
    got = group_normalized_advantages(scores, sizes, eps=1e-6, unbiased=False)
    want = ref_group_adv(scores.tolist(), sizes, True, 1e-6, unbiased=False)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_group_normalized_advantages_defaults():
    """Defaults: scaled by the unbiased std plus eps = 1e-6 (a group of spread ~1e-6 shows eps)."""
    scores = torch.tensor([0.0, 2e-6, 1.0, 3.0, 8.0], dtype=torch.float64)
    want = ref_group_adv(scores.tolist(), [2, 3], True, 1e-6)
    torch.testing.assert_close(
        group_normalized_advantages(scores, [2, 3]), torch.tensor(want, dtype=torch.float64)
    )


def test_group_normalized_advantages_rejects_bad_sizes():
    with pytest.raises(ValueError, match="sum to len"):
        group_normalized_advantages(torch.zeros(4), [2, 1])
    with pytest.raises(ValueError, match="must be >= 1"):  # sums to 4, but a group is empty
        group_normalized_advantages(torch.zeros(4), [2, 0, 2])


@given(
    packed_batches(max_b=5, max_len=8),
    st.integers(0, 10_000),
    st.sampled_from(["token_mean", "seq_mean"]),
)
@settings(max_examples=40, deadline=None)
def test_grpo_loss_matches_loop(pk: Packed, seed: int, reduction: str):
    eps, beta = 0.2, 0.04
    lp, old, _ = make_policy_batch(pk, seed)
    ref = old + 0.2 * randn(pk.t1, seed + 5)
    scores = randn(len(pk.lens), seed + 6)
    sizes = [len(pk.lens)]
    adv = broadcast_to_tokens(group_normalized_advantages(scores, sizes), pk.mask(), pk.cu)
    loss, stats = grpo_loss(lp, old, ref, adv, pk.mask(), pk.cu, eps, beta, reduction=reduction)
    loss.backward()

    leaf = lp.detach().clone().requires_grad_()
    seq_means, all_terms, s = [], [], 0
    for n, ms in zip(pk.lens, pk.mask_list()):
        terms = []
        for t in range(n - 1):
            if ms[t]:
                pg = ref_token_pg(leaf[s + t], float(old[s + t]), float(adv[s + t]), eps, None)
                d = float(ref[s + t]) - leaf[s + t]
                terms.append(pg + beta * (torch.exp(d) - d - 1))
        seq_means.append(sum(terms) / len(terms))
        all_terms += terms
        s += n - 1
    want = (
        sum(all_terms) / len(all_terms)
        if reduction == "token_mean"
        else sum(seq_means) / len(seq_means)
    )
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(lp.grad, leaf.grad)
    assert float(stats.ref_kl) >= 0.0


def test_grpo_loss_unknown_reduction():
    pk = Packed([3], [1])
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="did you mean 'seq_mean'"):
        grpo_loss(z, z, z, z, pk.mask(), pk.cu, 0.2, 0.1, reduction="seqmean")
    with pytest.raises(
        ValueError, match=r"^unknown loss reduction 'zzz', known: \['seq_mean', 'token_mean'\]$"
    ):
        grpo_loss(z, z, z, z, pk.mask(), pk.cu, 0.2, 0.1, reduction="zzz")


def test_policy_loss_and_grpo_loss_pass_the_dual_clip_on():
    """Ratio 10 with A = -1: the loss -A r = 10 is capped at -c A = 3 (dual_clip c = 3)."""
    lp, zero, adv = torch.tensor([math.log(10.0)]), torch.zeros(1), torch.tensor([-1.0])
    mask, cu = torch.ones(1, dtype=torch.bool), torch.tensor([0, 2])
    plain, _ = policy_loss(lp, zero, adv, mask, cu, 0.2)
    capped, stats = policy_loss(lp, zero, adv, mask, cu, 0.2, dual_clip=3.0)
    assert float(plain) == pytest.approx(10.0) and float(capped) == pytest.approx(3.0)
    assert float(stats.dual_clip_frac) == 1.0
    grpo, _ = grpo_loss(lp, zero, lp, adv, mask, cu, 0.2, 0.1, dual_clip=3.0)  # ref = lp: KL 0
    assert float(grpo) == pytest.approx(3.0)
