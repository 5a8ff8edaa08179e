import math

import pytest
import torch
from alg_testutils import Packed, packed_batches, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from realflow.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    grpo_loss,
    kl_estimate,
    kl_shaped_rewards,
    ppo_actor_loss,
    process_scores,
)


def test_kl_estimators_match_formulas():
    lp, ref = randn(20, 0), randn(20, 1)
    for kind, f in {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: math.exp(b - a) - (b - a) - 1,
    }.items():
        want = [f(a, b) for a, b in zip(lp.tolist(), ref.tolist())]
        torch.testing.assert_close(
            kl_estimate(lp, ref, kind), torch.tensor(want, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="did you mean 'k3'"):
        kl_estimate(lp, ref, "k33")
    with pytest.raises(
        ValueError, match=r"^unknown KL estimator 'zzz', known: \['k1', 'k2', 'k3'\]$"
    ):
        kl_estimate(lp, ref, "zzz")  # nothing close: no hint
    # The default is k3.
    want = [math.exp(b - a) - (b - a) - 1 for a, b in zip(lp.tolist(), ref.tolist())]
    torch.testing.assert_close(kl_estimate(lp, ref), torch.tensor(want, dtype=torch.float64))


# Two known categorical distributions: pi (the sampling policy) and ref. KL(pi || ref) and
# KL(ref || pi) differ, so an estimator of the wrong direction (or sign) cannot pass for the other.
PI = [0.6, 0.25, 0.1, 0.05]
REF = [0.25, 0.25, 0.25, 0.25]


def exact_kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def sampled_logprobs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(x) and log ref(x) of n tokens x ~ pi (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.multinomial(torch.tensor(PI, dtype=torch.float64), n, replacement=True, generator=g)
    return torch.tensor(PI, dtype=torch.float64).log()[x], torch.tensor(REF).double().log()[x]


def std_error(samples: torch.Tensor) -> float:
    return float(samples.std()) / math.sqrt(samples.numel())


def assert_mean_near(samples: torch.Tensor, want: float, n_se: float = 5.0) -> None:
    mean = float(samples.mean())
    assert abs(mean - want) < n_se * std_error(samples), (mean, want, std_error(samples))


def test_exact_expectations_of_the_estimators():
    """E_{x~pi} of k1 and k3 is KL(pi || ref) exactly; k2's is E[log(pi/ref)^2] / 2."""
    kl = exact_kl(PI, REF)
    want_k2 = sum(a * 0.5 * math.log(a / b) ** 2 for a, b in zip(PI, REF))
    p = torch.tensor(PI, dtype=torch.float64)
    logp, logq = p.log(), torch.tensor(REF, dtype=torch.float64).log()
    for kind, want in (("k1", kl), ("k2", want_k2), ("k3", kl)):
        assert float((p * kl_estimate(logp, logq, kind)).sum()) == pytest.approx(want, rel=1e-12)


def test_monte_carlo_estimates_converge_to_kl_of_the_sampling_policy():
    kl, reverse = exact_kl(PI, REF), exact_kl(REF, PI)
    assert kl > 0.2 and abs(kl - reverse) > 0.05  # the direction is visible
    logp, logq = sampled_logprobs(200_000)
    k1, k2, k3 = (kl_estimate(logp, logq, k) for k in ("k1", "k2", "k3"))
    assert_mean_near(k1, kl)
    assert_mean_near(k3, kl)
    assert bool((k3 >= 0).all()) and bool((k2 >= 0).all())
    # k2 is biased: its mean is E[log(pi/ref)^2] / 2, measurably away from the KL.
    want_k2 = sum(a * 0.5 * math.log(a / b) ** 2 for a, b in zip(PI, REF))
    assert_mean_near(k2, want_k2)
    assert abs(want_k2 - kl) > 20 * std_error(k2)


def test_policy_loss_kl_stats_estimate_kl_of_the_sampler():
    """PPO's approx_kl (tokens drawn by the old policy) and GRPO's ref_kl (tokens drawn by pi)
    estimate KL(sampler || other) with the right sign."""
    kl = exact_kl(PI, REF)
    logp, logq = sampled_logprobs(200_000, seed=1)
    mask = torch.ones_like(logp, dtype=torch.bool)
    k1, k3 = kl_estimate(logp, logq, "k1"), kl_estimate(logp, logq, "k3")
    # PPO: the old policy PI drew the tokens; the current policy is REF. KL(old || new).
    _, s = ppo_actor_loss(logq, logp, torch.zeros_like(logp), mask, eps_clip=0.2)
    assert abs(float(s.approx_kl_k1) - kl) < 5 * std_error(k1)
    assert abs(float(s.approx_kl_k3) - kl) < 5 * std_error(-logq + logp + torch.expm1(logq - logp))
    # GRPO: the current policy PI drew the tokens; ref is REF. KL(pi || ref).
    cu = torch.tensor([0, logp.numel() + 1], dtype=torch.int32)
    _, s = grpo_loss(logp, logp, logq, torch.zeros_like(logp), mask, cu, 0.2, 0.1)
    assert abs(float(s.ref_kl) - kl) < 5 * std_error(k3)


def test_fixed_controller():
    c = FixedKLController(0.1)
    c.update(123.0, 64)
    assert c.value == 0.1
    d = FixedKLController(0.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.1
    with pytest.raises(ValueError, match=r"^KL coef must be >= 0, got -0.1$"):
        FixedKLController(-0.1)


def test_adaptive_controller_bounds():
    """init_coef may be 0 (then it stays 0); init_coef < 0, target <= 0, horizon <= 0 are refused."""
    c = AdaptiveKLController(0.0, 1.0, 1.0)
    c.update(5.0, 10)
    assert c.value == 0.0
    for bad in ((-0.1, 1.0, 1.0), (0.1, 0.0, 1.0), (0.1, 1.0, 0.0)):
        with pytest.raises(ValueError, match="need init_coef >= 0, target > 0, horizon > 0"):
            AdaptiveKLController(*bad)


def test_adaptive_controller_follows_ziegler_and_resumes_exactly():
    init, target, horizon = 0.2, 6.0, 10_000
    c = AdaptiveKLController(init, target, horizon)
    kls = [1.0, 6.0, 30.0, 7.0, 5.5, 0.0]
    want = init
    for i, kl in enumerate(kls[:3]):
        c.update(kl, 256)
        err = min(max(kl / target - 1, -0.2), 0.2)
        want = want * (1 + err * 256 / horizon)
        assert c.value == want, i
    resumed = AdaptiveKLController(1.0, 1.0, 1.0)
    resumed.load_state_dict(c.state_dict())
    for kl in kls[3:]:
        c.update(kl, 100)
        resumed.update(kl, 100)
        assert resumed.value == c.value
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, 0.0, 1.0)


@pytest.mark.parametrize("ratio", [3.0, 1.1, 1.0, 0.95, 0.5, 0.0])
def test_adaptive_controller_grows_above_target_and_shrinks_below(ratio):
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""
    target, horizon, n = 4.0, 1000.0, 50
    c = AdaptiveKLController(0.1, target, horizon)
    c.update(ratio * target, n)
    err = min(max(ratio - 1.0, -0.2), 0.2)
    assert c.value == pytest.approx(0.1 * (1 + err * n / horizon), rel=1e-12)
    if ratio > 1:
        assert c.value > 0.1
    elif ratio < 1:
        assert c.value < 0.1
    else:
        assert c.value == 0.1


def ref_shaped(pk, score, lp, ref, kl_coef, no_eos, scale, bias, clip, mask_zero, penalty):
    out = []
    for i, (ls, rs, ms) in enumerate(zip(pk.split_t1(lp), pk.split_t1(ref), pk.mask_list())):
        s = (float(score[i]) - bias) * scale
        s = max(-clip, min(clip, s))
        if bool(no_eos[i]) and mask_zero:
            s = 0.0
        if bool(no_eos[i]) and penalty is not None:
            s -= penalty
        last = max(t for t in range(len(ms)) if ms[t])
        for t in range(len(ms)):
            r = -kl_coef * (ls[t] - rs[t]) if ms[t] else 0.0
            if t == last:
                r += s
            out.append(r)
    return torch.tensor(out, dtype=torch.float64)


@given(
    packed_batches(),
    st.integers(0, 1000),
    st.booleans(),
    st.sampled_from([None, 0.5]),
    st.sampled_from([math.inf, 1.5]),
)
@settings(max_examples=40, deadline=None)
def test_kl_shaped_rewards_matches_loop(pk: Packed, seed, mask_zero, penalty, clip):
    B = len(pk.lens)
    score = randn(B, seed) * 3
    lp, ref = randn(pk.t1, seed + 1), randn(pk.t1, seed + 2)
    no_eos = torch.rand(B, generator=torch.Generator().manual_seed(seed)) < 0.5
    kw = dict(reward_scale=2.0, reward_bias=0.3, reward_clip=clip)
    got = kl_shaped_rewards(
        score, lp, ref, pk.mask(), pk.cu, 0.05, no_eos,
        mask_no_eos_with_zero=mask_zero, no_eos_penalty=penalty, **kw,
    )  # fmt: skip
    want = ref_shaped(pk, score, lp, ref, 0.05, no_eos, 2.0, 0.3, clip, mask_zero, penalty)
    torch.testing.assert_close(got, want)


def test_process_scores_defaults_and_clip_bound():
    """By default the scores pass through unchanged, truncated or not."""
    score = torch.tensor([1.5, -0.25, 3.0], dtype=torch.float64)
    no_eos = torch.tensor([False, True, True])
    assert process_scores(score, no_eos).tolist() == [1.5, -0.25, 3.0]
    assert process_scores(score, no_eos, reward_clip=0.5).tolist() == [0.5, -0.25, 0.5]
    # The penalty is applied in the scores' dtype (0.1 is not a float32 number).
    got = process_scores(score, no_eos, no_eos_penalty=0.1).tolist()
    assert got == [1.5, -0.25 - 0.1, 3.0 - 0.1]
    with pytest.raises(ValueError, match="^reward_clip must be > 0, got 0.0$"):
        process_scores(score, no_eos, reward_clip=0.0)


def test_kl_shaped_rewards_defaults():
    """Defaults: the raw score on the last answer token, truncated sequences not gated."""
    pk = Packed([4, 3, 5], [2, 1, 3])
    score = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    lp, ref = randn(pk.t1, 0), randn(pk.t1, 1)
    no_eos = torch.tensor([True, False, True])
    got = kl_shaped_rewards(score, lp, ref, pk.mask(), pk.cu, 0.1, no_eos)
    want = ref_shaped(pk, score, lp, ref, 0.1, no_eos, 1.0, 0.0, math.inf, False, None)
    torch.testing.assert_close(got, want)


def test_kl_shaped_rewards_of_bf16_inputs_are_float32():
    """bf16 log-probs and scores (a bf16 model's outputs) are shaped in float32, not bf16."""
    pk = Packed([4, 3], [2, 1])
    lp, ref = randn(pk.t1, 3).to(torch.bfloat16), randn(pk.t1, 4).to(torch.bfloat16)
    score = torch.tensor([1.3, -0.7]).to(torch.bfloat16)
    no_eos = torch.tensor([False, True])
    got = kl_shaped_rewards(score, lp, ref, pk.mask(), pk.cu, 0.1, no_eos, reward_scale=3.1)
    assert got.dtype == torch.float32
    want = ref_shaped(pk, score.double(), lp.double(), ref.double(), 0.1, no_eos, 3.1, 0.0,
                      math.inf, False, None)  # fmt: skip
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)


def test_kl_shaped_rewards_requires_answer_tokens():
    pk = Packed([3, 3], [1, 1])
    mask = torch.tensor([True, True, False, False])
    z = torch.zeros(4)
    with pytest.raises(ValueError, match="sequence 1 has no answer"):
        kl_shaped_rewards(torch.zeros(2), z, z, mask, pk.cu, 0.1, torch.zeros(2, dtype=torch.bool))
    # Sequence 0's last answer token is at position 0; the error still names sequence 1.
    pk = Packed([2, 3], [1, 1])
    mask = torch.tensor([True, False, False])
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="^sequence 1 has no answer"):
        kl_shaped_rewards(torch.zeros(2), z, z, mask, pk.cu, 0.1, torch.zeros(2, dtype=torch.bool))
