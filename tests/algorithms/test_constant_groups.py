"""Centring statistics are exact for constant data: a group (or a masked batch) whose values are
all equal gives exactly zero advantages, whatever the value, the group size or the dtype.

A float sum of repeated values is inexact (8 x 2.9 in float32 sums to 23.199999 / 8 != 2.9), and
dividing the ~2e-7 residue by `std + 1e-6` gave every member of an all-equal GRPO group the same
advantage of up to +-0.32. The references here are exact by construction: a constant group's
advantage is 0, and for mixed groups a float64 plain loop.
"""

from __future__ import annotations

import math

import pytest
import torch

from realflow.algorithms import (
    RunningMeanStd,
    group_normalized_advantages,
    masked_var,
    masked_whiten,
)

# Values whose repeated float sums are inexact in float32 and/or float64 (checked below).
VALUES = [2.9, 0.7, 0.1, 1 / 3, -3.3, 1e4 + 0.1]
SIZES = [2, 3, 7, 8, 16, 33]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def test_the_values_do_expose_the_flaw():
    # Guard against a test that cannot fail: the naive mean of these groups is inexact.
    inexact = 0
    for v in VALUES:
        for n in SIZES:
            for dt in (torch.float32, torch.float64):
                x = torch.full((n,), v, dtype=dt)
                inexact += int(x.sum() / n != x[0])
    assert inexact >= 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_constant_groups_have_zero_advantage(dtype, scale_by_std, unbiased):
    groups = [torch.full((n,), v, dtype=dtype) for v in VALUES for n in SIZES]
    sizes = [len(g) for g in groups]
    adv = group_normalized_advantages(
        torch.cat(groups), sizes, scale_by_std=scale_by_std, unbiased=unbiased
    )
    assert adv.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.count_nonzero(adv) == 0, adv[adv != 0][:5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_and_mixed_groups_side_by_side(dtype):
    # Constant groups stay exactly 0 next to mixed ones; mixed ones match a float64 loop.
    g = torch.Generator().manual_seed(0)
    groups, sizes = [], []
    for i, v in enumerate(VALUES):
        n = SIZES[i % len(SIZES)]
        groups.append(torch.full((n,), v, dtype=dtype))
        groups.append((torch.randn(n, generator=g, dtype=torch.float64) + v).to(dtype))
        sizes += [n, n]
    scores = torch.cat(groups)
    adv = group_normalized_advantages(scores, sizes, eps=1e-6)
    start = 0
    for k, n in enumerate(sizes):
        got = adv[start : start + n]
        xs = [float(x) for x in scores[start : start + n]]
        start += n
        if k % 2 == 0:
            assert torch.count_nonzero(got) == 0
            continue
        mean = math.fsum(xs) / n
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
        want = torch.tensor([(x - mean) / (std + 1e-6) for x in xs], dtype=torch.float64)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", VALUES)
def test_masked_whiten_and_var_of_constant_values(dtype, value):
    # The masked-out positions hold other values: only the masked-in ones are constant.
    x = torch.full((40,), value, dtype=dtype)
    mask = torch.arange(40) % 3 != 0
    x[~mask] = torch.linspace(-5, 5, int((~mask).sum())).to(dtype)
    assert float(masked_var(x, mask)) == 0.0
    assert torch.count_nonzero(masked_whiten(x, mask)) == 0
    kept = masked_whiten(x, mask, shift_mean=False)
    assert torch.equal(kept[mask], x[mask]) and torch.count_nonzero(kept[~mask]) == 0


def test_masked_whiten_still_matches_plain_formula():
    # The exactness change must not move ordinary results.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, generator=g, dtype=torch.float64) * 3 + 2.9
    mask = torch.rand(50, generator=g) > 0.3
    kept = [float(v) for v, k in zip(x, mask) if k]
    mean = math.fsum(kept) / len(kept)
    var = math.fsum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
    want = [(float(v) - mean) / math.sqrt(var + 1e-8) if k else 0.0 for v, k in zip(x, mask)]
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor(want, dtype=torch.float64))
    assert torch.count_nonzero(masked_whiten(x, torch.zeros(50, dtype=torch.bool))) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", VALUES)
def test_running_mean_std_of_constant_stream(dtype, value):
    rms = RunningMeanStd()
    for n in (8, 3, 16, 7):
        rms.update(torch.full((n,), value, dtype=dtype))
    assert float(rms.var) == 0.0
    x = torch.full((5,), value, dtype=dtype)
    assert float(rms.mean) == float(x[0])
    assert torch.count_nonzero(rms.normalize(x)) == 0
    assert torch.equal(rms.denormalize(rms.normalize(x)), x)
