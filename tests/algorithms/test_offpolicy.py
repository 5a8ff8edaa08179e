"""The off-policy corrections of asynchronous rollouts (decoupled PPO, truncated importance
sampling) against plain per-token loops written from the formulas: loss value and gradient."""

from __future__ import annotations

import math

import pytest
import torch
from alg_testutils import Packed, packed_batches, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from realflow.algorithms.offpolicy import decoupled_weights, tis_surrogate
from realflow.algorithms.ppo import policy_loss


def decoupled_token(lp: float, prox: float, behav: float, a: float, eps: float, cap: float):
    """(loss, d loss / d lp) of one token of AReaL's decoupled objective."""
    w = math.exp(prox - behav)
    if cap > 0 and w > cap:
        w = 0.0
    r = math.exp(lp - prox)
    unclipped, clipped = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
    if unclipped >= clipped:  # the unclipped branch is the max: its gradient flows
        return w * unclipped, w * -a * r
    return w * clipped, 0.0


def tis_token(lp: float, behav: float, a: float, cap: float):
    """(loss, d loss / d lp) of one token of truncated importance sampling."""
    w = min(math.exp(lp - behav), cap)
    return -a * w, -a * w


def plain_loop(pk: Packed, token_fn, *per_token: torch.Tensor):
    """The token mean over answer tokens of `token_fn`'s loss, and the gradient per token."""
    columns = [x.tolist() for x in per_token]
    mask = [m for seq in pk.mask_list() for m in seq]
    n = sum(mask)
    loss, grad = 0.0, []
    for t, m in enumerate(mask):
        if not m:
            grad.append(0.0)
            continue
        value, g = token_fn(*(c[t] for c in columns))
        loss += value / n
        grad.append(g / n)
    return loss, grad


@given(packed_batches(max_b=5, max_len=8), st.integers(0, 10_000), st.sampled_from([0.0, 1.3]))
@settings(max_examples=60, deadline=None)
def test_decoupled_loss_matches_loop(pk: Packed, seed, cap):
    eps = 0.2
    behav = randn(pk.t1, seed) - 1.0
    prox = behav + 0.3 * randn(pk.t1, seed + 1)
    lp = (prox + 0.3 * randn(pk.t1, seed + 2)).requires_grad_()
    adv = randn(pk.t1, seed + 3)
    loss, stats = policy_loss(
        lp, behav, adv, pk.mask(), pk.cu, eps, correction="decoupled",
        prox_logprobs_T1=prox, is_cap=cap,
    )  # fmt: skip
    loss.backward()
    want, grad = plain_loop(
        pk,
        lambda a, b, c, d: decoupled_token(a, b, c, d, eps, cap),
        lp.detach(),
        prox,
        behav,
        adv,
    )
    assert float(loss.detach()) == pytest.approx(want, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(lp.grad, torch.tensor(grad, dtype=torch.float64))
    weights = [math.exp(p - b) for p, b in zip(prox.tolist(), behav.tolist())]
    mask = pk.mask().tolist()
    capped = [cap > 0 and w > cap for w, m in zip(weights, mask) if m]
    assert float(stats.is_capped_frac) == pytest.approx(sum(capped) / max(1, len(capped)))


@given(packed_batches(max_b=5, max_len=8), st.integers(0, 10_000), st.sampled_from([1.0, 2.0]))
@settings(max_examples=60, deadline=None)
def test_tis_loss_matches_loop(pk: Packed, seed, cap):
    behav = randn(pk.t1, seed) - 1.0
    lp = (behav + 0.5 * randn(pk.t1, seed + 1)).requires_grad_()
    adv = randn(pk.t1, seed + 2)
    loss, stats = policy_loss(lp, behav, adv, pk.mask(), pk.cu, 0.2, correction="tis", is_cap=cap)
    loss.backward()
    want, grad = plain_loop(pk, lambda a, b, c: tis_token(a, b, c, cap), lp.detach(), behav, adv)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(lp.grad, torch.tensor(grad, dtype=torch.float64))


def test_on_policy_samples_make_both_corrections_the_plain_loss():
    """Behaviour = proximal = current weights (staleness 0): the decoupled weight is 1 and the
    decoupled loss is the plain clipped loss; tis with a cap >= 1 has the same gradient."""
    pk = Packed([6, 5], [2, 3])
    old = randn(pk.t1, 0) - 1.0
    adv = randn(pk.t1, 1)
    grads = {}
    for name, kw in {
        "none": {},
        "decoupled": {"correction": "decoupled", "prox_logprobs_T1": old, "is_cap": 2.0},
        "tis": {"correction": "tis", "is_cap": 2.0},
    }.items():
        lp = old.clone().requires_grad_()
        loss, _ = policy_loss(lp, old, adv, pk.mask(), pk.cu, 0.2, **kw)
        loss.backward()
        grads[name] = lp.grad
    torch.testing.assert_close(grads["decoupled"], grads["none"])
    torch.testing.assert_close(grads["tis"], grads["none"])


def test_decoupled_weights_are_not_capped_by_default():
    """is_cap defaults to 0, no cap: a weight exp(2 - 0) = 7.39 is kept."""
    pk = Packed([2], [1])
    lp, behav, prox = torch.zeros(1), torch.zeros(1), torch.tensor([2.0])
    _, stats = policy_loss(
        lp, behav, torch.ones(1), pk.mask(), pk.cu, 0.2, correction="decoupled",
        prox_logprobs_T1=prox,
    )  # fmt: skip
    assert float(stats.is_capped_frac) == 0.0
    assert float(stats.is_weight_mean) == pytest.approx(math.exp(2.0), rel=1e-6)


def test_bad_corrections_are_refused():
    pk = Packed([4], [2])
    x = torch.zeros(pk.t1)
    with pytest.raises(ValueError, match="^unknown correction 'iw', known: none, decoupled, tis$"):
        policy_loss(x, x, x, pk.mask(), pk.cu, 0.2, correction="iw")
    with pytest.raises(ValueError, match="^correction 'decoupled' needs prox_logprobs_T1$"):
        policy_loss(x, x, x, pk.mask(), pk.cu, 0.2, correction="decoupled")
    with pytest.raises(ValueError, match="needs is_cap > 0"):
        tis_surrogate(x, x, x, 0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        decoupled_weights(x, x, -1.0)
