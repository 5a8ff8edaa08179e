import pytest
import torch
from alg_testutils import Packed, packed_batches, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from realflow.algorithms import cu_seqlens_from_lens, gae_packed, split_critic_values


def ref_gae(
    rewards: list[float],
    values: list[float],
    mask: list[int],
    bootstrap: float,
    gamma: float,
    lam: float,
) -> tuple[list[float], list[float]]:
    """One sequence, token by token, over the masked positions only."""
    steps = [t for t in range(len(rewards)) if mask[t]]
    adv = [0.0] * len(rewards)
    ret = [0.0] * len(rewards)
    next_value, next_adv = bootstrap, 0.0
    for t in reversed(steps):
        delta = rewards[t] + gamma * next_value - values[t]
        next_adv = delta + gamma * lam * next_adv
        adv[t] = next_adv
        ret[t] = next_adv + values[t]
        next_value = values[t]
    return adv, ret


def run_both(
    pk: Packed, seed: int, gamma: float, lam: float, mask_lists: list[list[int]] | None = None
):
    mask_lists = mask_lists or pk.mask_list()
    mask = torch.tensor([v for m in mask_lists for v in m], dtype=torch.bool)
    r, v = randn(pk.t1, seed), randn(pk.t1, seed + 1)
    boot = randn(len(pk.lens), seed + 2)
    adv, ret = gae_packed(r, v, pk.cu, boot, gamma, lam, mask)
    want_adv, want_ret = [], []
    for i, (rs, vs) in enumerate(zip(pk.split_t1(r), pk.split_t1(v))):
        a, b = ref_gae(rs, vs, mask_lists[i], float(boot[i]), gamma, lam)
        want_adv += a
        want_ret += b
    return (
        adv,
        ret,
        torch.tensor(want_adv, dtype=torch.float64),
        torch.tensor(want_ret, dtype=torch.float64),
    )


@given(
    packed_batches(max_b=6, max_len=12),
    st.integers(0, 10_000),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
)
@settings(max_examples=60, deadline=None)
def test_gae_matches_plain_loop(pk: Packed, seed: int, gamma: float, lam: float):
    adv, ret, want_adv, want_ret = run_both(pk, seed, gamma, lam)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)


@given(packed_batches(max_b=4, max_len=10), st.integers(0, 10_000), st.data())
@settings(max_examples=30, deadline=None)
def test_gae_with_holes_in_mask(pk: Packed, seed: int, data):
    """Masked positions are the time steps in order even when the mask is not a suffix."""
    masks = []
    for n in pk.lens:
        m = data.draw(st.lists(st.integers(0, 1), min_size=n - 1, max_size=n - 1))
        masks.append(m)
    adv, ret, want_adv, want_ret = run_both(pk, seed, 0.9, 0.8, masks)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)


def test_gae_prompt_positions_are_zero_and_monte_carlo_limit():
    pk = Packed([5, 4], [3, 1])
    r = torch.tensor([9.0, 9.0, 1.0, 2.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # prompt r ignored
    v = torch.zeros(pk.t1, dtype=torch.float64)
    adv, ret = gae_packed(
        r, v, pk.cu, torch.tensor([0.0, 5.0], dtype=torch.float64), 1.0, 1.0, pk.mask()
    )
    # gamma = lam = 1, V = 0: advantage = return = future reward sum (+ bootstrap if truncated).
    assert ret.tolist() == [0.0, 0.0, 3.0, 2.0, 7.0, 7.0, 6.0]
    assert adv.tolist() == ret.tolist()


def test_gae_with_critic_values_bootstrap_convention():
    lens = [3, 3]
    cu = cu_seqlens_from_lens(lens)
    values_T = torch.tensor([1.0, 2.0, 4.0, 1.0, 2.0, 4.0])
    v_t1, boot = split_critic_values(values_T, cu, torch.tensor([False, True]))
    r = torch.tensor([0.0, 1.0, 0.0, 1.0])
    mask = torch.ones(4, dtype=torch.bool)
    adv, _ = gae_packed(r, v_t1, cu, boot, 1.0, 1.0, mask)
    # EOS: last delta = 1 + 0 - 2, first 0 + 2 - 1; truncated: last delta = 1 + 4 - 2.
    assert adv.tolist() == [0.0, -1.0, 4.0, 3.0]


def test_gae_shape_errors():
    pk = Packed([3], [1])
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="bootstrap_B"):
        gae_packed(x, x, pk.cu, torch.zeros(2), 1.0, 1.0, pk.mask())
    with pytest.raises(ValueError, match="shape"):
        gae_packed(x, torch.zeros(3), pk.cu, torch.zeros(1), 1.0, 1.0, pk.mask())
