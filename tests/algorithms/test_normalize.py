import math

import pytest
import torch
from alg_testutils import randn
from hypothesis import given, settings
from hypothesis import strategies as st

from realflow.algorithms import RunningMeanStd, masked_mean, masked_var, masked_whiten
from realflow.algorithms.normalize import first_masked, masked_sum


def plain_mean_var(xs: list[float], unbiased: bool) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    ss = sum((x - mean) ** 2 for x in xs)
    return mean, ss / (n - 1 if unbiased else n)


@given(st.lists(st.tuples(st.floats(-100, 100), st.booleans()), min_size=2, max_size=40))
@settings(max_examples=60, deadline=None)
def test_masked_stats_match_plain(pairs):
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    m = torch.tensor([p[1] for p in pairs])
    kept = [p[0] for p in pairs if p[1]]
    if len(kept) < 2:
        assert float(masked_var(x, m)) == 0.0
        return
    mean, var = plain_mean_var(kept, unbiased=True)
    _, var_b = plain_mean_var(kept, unbiased=False)
    assert float(masked_mean(x, m)) == pytest.approx(mean, abs=1e-9)
    assert float(masked_var(x, m)) == pytest.approx(var, rel=1e-9, abs=1e-9)
    assert float(masked_var(x, m, unbiased=False)) == pytest.approx(var_b, rel=1e-9, abs=1e-9)
    w = masked_whiten(x, m, eps=1e-8)
    want = [(v - mean) / math.sqrt(var + 1e-8) if k else 0.0 for v, k in pairs]
    torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64))
    w2 = masked_whiten(x, m, shift_mean=False, eps=1e-8)
    want2 = [(v - mean) / math.sqrt(var + 1e-8) + mean if k else 0.0 for v, k in pairs]
    torch.testing.assert_close(w2, torch.tensor(want2, dtype=torch.float64))
    w3 = masked_whiten(x, m, unbiased=False, eps=1e-8)
    want3 = [(v - mean) / math.sqrt(var_b + 1e-8) if k else 0.0 for v, k in pairs]
    torch.testing.assert_close(w3, torch.tensor(want3, dtype=torch.float64))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float64])
def test_masked_sum_and_mean_answer_in_the_dtype_of_x(mask_dtype):
    """A mask of any dtype is a weight cast to x's dtype (packed.py's convention): float32 values
    with a float64 or int mask give float32 results, equal to a plain sum over the kept values."""
    xs, keep = [1.5, -2.25, 4.0, 0.125], [1, 0, 1, 1]
    x = torch.tensor(xs, dtype=torch.float32)
    m = torch.tensor(keep).to(mask_dtype)
    total, mean = masked_sum(x, m), masked_mean(x, m)
    assert total.dtype == torch.float32 and mean.dtype == torch.float32
    want = sum(v for v, k in zip(xs, keep) if k)
    assert float(total) == want and float(mean) == pytest.approx(want / 3, rel=1e-7)


def test_masked_mean_empty_mask_is_zero_and_differentiable():
    x = torch.ones(3, requires_grad=True)
    m = torch.zeros(3, dtype=torch.bool)
    out = masked_mean(x, m)
    out.backward()
    assert float(out.detach()) == 0.0 and x.grad.tolist() == [0.0, 0.0, 0.0]


@given(st.lists(st.integers(0, 30), min_size=1, max_size=6), st.integers(0, 1000))
@settings(max_examples=50, deadline=None)
def test_running_mean_std_equals_full_data(chunk_sizes, seed):
    rms = RunningMeanStd()
    everything: list[float] = []
    for i, n in enumerate(chunk_sizes):
        x = randn(n, seed + i, dtype=torch.float32) * 5 + 3
        mask = torch.arange(n) % 3 != 0
        rms.update(x, mask)
        everything += [float(v) for v, k in zip(x, mask) if k]
    if not everything:
        assert rms.count == 0 and float(rms.mean) == 0.0 and float(rms.var) == 1.0
        return
    mean, var = plain_mean_var(everything, unbiased=False)
    assert rms.count == len(everything)
    assert float(rms.mean) == pytest.approx(mean, rel=1e-10, abs=1e-10)
    assert float(rms.var) == pytest.approx(var, rel=1e-9, abs=1e-10)


def test_running_mean_std_normalize_roundtrip_and_resume():
    rms = RunningMeanStd(eps=1e-5)
    rms.update(randn(50, 0) * 2 + 1)
    x = randn(7, 1, dtype=torch.float32)
    y = rms.normalize(x)
    want = (x.double() - rms.mean) / math.sqrt(float(rms.var) + 1e-5)
    torch.testing.assert_close(y, want.float())
    torch.testing.assert_close(rms.denormalize(y), x)
    other = RunningMeanStd()
    other.load_state_dict(rms.state_dict())
    more = randn(13, 2)
    rms.update(more)
    other.update(more)
    assert other.state_dict() == rms.state_dict()


def test_running_mean_std_before_and_after_the_first_update():
    """Defaults: mean 0 and var 1 (float64) before any update, eps = 1e-5."""
    rms = RunningMeanStd()
    x = torch.tensor([0.3, -2.0, 7.0], dtype=torch.float64)
    want = torch.tensor([v / math.sqrt(1 + 1e-5) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(rms.normalize(x), want, rtol=1e-15, atol=0.0)
    rms.update(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    var = sum((v - 7 / 3) ** 2 for v in (1.0, 2.0, 4.0)) / 3
    assert float(rms.std) == pytest.approx(math.sqrt(var + 1e-5), rel=1e-12)


def test_first_masked():
    x = torch.tensor([4.0, 5.0, 6.0])
    assert float(first_masked(x, torch.tensor([False, True, True]))) == 5.0
    assert float(first_masked(x, torch.tensor([0.0, 0.0, 2.0]))) == 6.0
    assert float(first_masked(x, torch.zeros(3, dtype=torch.bool))) == 0.0  # none masked in
    assert float(first_masked(x[:1], torch.tensor([True]))) == 4.0
    empty = first_masked(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert empty.shape == () and float(empty) == 0.0


def test_running_mean_std_keeps_the_dtype_of_x():
    """normalize/denormalize answer in x's dtype, a 0-dim x included (float64 stats inside)."""
    rms = RunningMeanStd()
    rms.update(torch.tensor([1.0, 2.0, 4.0]))
    for x in (torch.tensor(3.0), torch.tensor([3.0, -1.0]), torch.tensor(3.0).half()):
        assert rms.normalize(x).dtype == x.dtype and rms.denormalize(x).dtype == x.dtype
