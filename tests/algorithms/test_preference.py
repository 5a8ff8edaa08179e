import math
import re

import pytest
import torch
from alg_testutils import Packed, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from realflow.algorithms import (
    dpo_loss,
    pairwise_rw_loss,
    sequence_logprobs,
    split_interleaved_pairs,
)


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Scalar log(sigmoid(x)) written out from exp/log (values here are moderate)."""
    return -torch.log1p(torch.exp(-x))


def ref_dpo(pc, pr, rc, rr, beta, loss_type, ls):
    terms, acc, margins = [], 0, []
    for i in range(len(pc)):
        logits = (pc[i] - pr[i]) - (float(rc[i]) - float(rr[i]))
        if loss_type == "sigmoid":
            terms.append(-(1 - ls) * log_sigmoid(beta * logits) - ls * log_sigmoid(-beta * logits))
        else:
            terms.append((logits - 1 / (2 * beta)) ** 2)
        cr = beta * (float(pc[i].detach()) - float(rc[i]))
        rj = beta * (float(pr[i].detach()) - float(rr[i]))
        acc += cr > rj
        margins.append(cr - rj)
    return sum(terms) / len(terms), acc / len(pc), sum(margins) / len(margins)


@given(
    st.integers(1, 8),
    st.integers(0, 10_000),
    st.sampled_from([("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)]),
    st.sampled_from([0.1, 0.5]),
)
@settings(max_examples=40, deadline=None)
def test_dpo_loss_value_grad_and_stats_match_loop(B, seed, kind, beta):
    loss_type, ls = kind
    pc = (randn(B, seed) - 5).requires_grad_()
    pr = (randn(B, seed + 1) - 5).requires_grad_()
    rc, rr = randn(B, seed + 2) - 5, randn(B, seed + 3) - 5
    loss, stats = dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type, label_smoothing=ls)
    loss.backward()
    pc2 = pc.detach().clone().requires_grad_()
    pr2 = pr.detach().clone().requires_grad_()
    want, acc, margin = ref_dpo(list(pc2), list(pr2), rc, rr, beta, loss_type, ls)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(pc.grad, pc2.grad)
    torch.testing.assert_close(pr.grad, pr2.grad)
    assert float(stats.reward_accuracy) == pytest.approx(acc)
    assert float(stats.margin) == pytest.approx(margin)
    assert float(stats.chosen_reward) == pytest.approx(beta * float((pc.detach() - rc).mean()))
    assert float(stats.rejected_reward) == pytest.approx(beta * float((pr.detach() - rr).mean()))
    assert float(stats.loss) == float(loss.detach())


def test_dpo_hand_value_and_errors():
    z = torch.zeros(1)
    loss, stats = dpo_loss(torch.tensor([1.0]), z, z, z, beta=1.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1.0)))
    assert float(stats.reward_accuracy) == 1.0
    ipo, stats = dpo_loss(z, z, z, z, beta=0.25, loss_type="ipo")
    assert float(ipo) == pytest.approx(4.0)
    assert float(stats.reward_accuracy) == 0.0  # a tie is not a win
    with pytest.raises(ValueError, match="did you mean 'ipo'"):
        dpo_loss(z, z, z, z, beta=0.1, loss_type="ipp")
    with pytest.raises(
        ValueError, match=r"^unknown DPO loss_type 'zzz', known: \['ipo', 'sigmoid'\]$"
    ):
        dpo_loss(z, z, z, z, beta=0.1, loss_type="zzz")  # nothing close: no hint
    with pytest.raises(ValueError, match="sigmoid DPO loss only"):
        dpo_loss(z, z, z, z, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"^beta must be > 0, got {beta}$"):
            dpo_loss(z, z, z, z, beta=beta)
    for ls in (0.5, -0.1):
        with pytest.raises(ValueError, match=rf"^label_smoothing must be in \[0, 0.5\), got {ls}$"):
            dpo_loss(z, z, z, z, beta=0.1, label_smoothing=ls)


def test_dpo_from_packed_sequences():
    """Summed answer log-probs of a packed [c0, r0, c1, r1] batch feed DPO directly."""
    pk = Packed([4, 3, 5, 3], [2, 2, 3, 1])
    lp = randn(pk.t1, 11).requires_grad_()
    ref = randn(pk.t1, 12)
    seq = sequence_logprobs(lp, pk.mask(), pk.cu)
    seq_ref = sequence_logprobs(ref, pk.mask(), pk.cu)
    pc, pr = split_interleaved_pairs(seq)
    rc, rr = split_interleaved_pairs(seq_ref)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    loss.backward()
    sums = [
        sum(v * m for v, m in zip(s, ms)) for s, ms in zip(pk.split_t1(lp.detach()), pk.mask_list())
    ]
    rs = [sum(v * m for v, m in zip(s, ms)) for s, ms in zip(pk.split_t1(ref), pk.mask_list())]
    want = 0.0
    for c, r in ((0, 1), (2, 3)):
        logits = (sums[c] - sums[r]) - (rs[c] - rs[r])
        want += math.log(1 + math.exp(-0.1 * logits)) / 2
    assert float(loss.detach()) == pytest.approx(want)
    # Prompt positions get no gradient.
    assert all(g == 0 for g, m in zip(lp.grad.tolist(), pk.mask().tolist()) if not m)


@given(st.lists(st.integers(1, 4), min_size=1, max_size=5), st.integers(0, 1000), st.booleans())
@settings(max_examples=40, deadline=None)
def test_pairwise_rw_loss_matches_loop(pairs_per_sample, seed, grouped):
    P = sum(pairs_per_sample)
    c = randn(P, seed).requires_grad_()
    r = randn(P, seed + 1)
    loss, stats = pairwise_rw_loss(c, r, pairs_per_sample if grouped else None)
    loss.backward()
    c2 = c.detach().clone().requires_grad_()
    per_pair = [-log_sigmoid(c2[i] - float(r[i])) for i in range(P)]
    if grouped:
        per_sample, s = [], 0
        for n in pairs_per_sample:
            per_sample.append(sum(per_pair[s : s + n]) / n)
            s += n
        want = sum(per_sample) / len(per_sample)
    else:
        want = sum(per_pair) / P
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach())
    torch.testing.assert_close(c.grad, c2.grad)
    acc = sum(float(c[i].detach()) > float(r[i]) for i in range(P)) / P
    assert float(stats.accuracy) == pytest.approx(acc)
    assert float(stats.loss) == float(loss.detach())
    cs, rs = c.detach().tolist(), r.tolist()
    assert float(stats.margin) == pytest.approx(sum(a - b for a, b in zip(cs, rs)) / P)
    assert float(stats.chosen_score) == pytest.approx(sum(cs) / P)
    assert float(stats.rejected_score) == pytest.approx(sum(rs) / P)


def test_pairwise_rw_accuracy_counts_strict_wins():
    _, stats = pairwise_rw_loss(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.0, 1.0, 2.0]))
    assert float(stats.accuracy) == pytest.approx(1 / 3)  # the tie is not a win


def test_pairwise_rw_loss_bad_groups():
    with pytest.raises(ValueError, match="pairs_per_sample"):
        pairwise_rw_loss(torch.zeros(3), torch.zeros(3), [1, 1])
    with pytest.raises(ValueError, match="pairs_per_sample must be >= 1"):
        pairwise_rw_loss(torch.zeros(3), torch.zeros(3), [2, 0, 1])  # sums to 3, one is empty


def test_split_interleaved_pairs_needs_even_1d():
    c, r = split_interleaved_pairs(torch.arange(6.0))
    assert c.tolist() == [0.0, 2.0, 4.0] and r.tolist() == [1.0, 3.0, 5.0]
    for shape in ((3,), (2, 2)):
        with pytest.raises(
            ValueError,
            match=rf"^need a 1-D tensor of even length, got shape {re.escape(str(shape))}$",
        ):
            split_interleaved_pairs(torch.zeros(shape))
