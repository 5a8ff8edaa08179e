import math

import pytest
import torch
from alg_testutils import Packed, packed_batches, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from realflow.algorithms import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_shaped_rewards,
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


def test_k3_is_unbiased_for_true_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    # Exact expectation over x ~ p of each unbiased estimator.
    for kind in ("k1", "k3"):
        est = kl_estimate(p.log(), q.log(), kind)
        assert float((p * est).sum()) == pytest.approx(true_kl, rel=1e-12)


def test_fixed_controller():
    c = FixedKLController(0.1)
    c.update(123.0, 64)
    assert c.value == 0.1
    d = FixedKLController(0.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.1


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


def test_kl_shaped_rewards_requires_answer_tokens():
    pk = Packed([3, 3], [1, 1])
    mask = torch.tensor([True, True, False, False])
    z = torch.zeros(4)
    with pytest.raises(ValueError, match="sequence 1 has no answer"):
        kl_shaped_rewards(torch.zeros(2), z, z, mask, pk.cu, 0.1, torch.zeros(2, dtype=torch.bool))
