"""Interval copies: the csrc extension and the pure-torch fallback against a plain slice loop."""

import pytest
import torch

from realflow.parallel import ops


def random_intervals(n_src: int, n_dst: int, count: int, max_len: int, seed: int):
    """Non-overlapping destination intervals (sources may overlap), int64."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (count,), generator=g)
    gaps = torch.randint(0, 4, (count,), generator=g)
    dst = torch.cumsum(lengths + gaps, 0) - lengths
    assert int(dst[-1] + lengths[-1]) <= n_dst
    src = (torch.rand(count, generator=g) * (n_src - lengths)).long()
    return dst[torch.randperm(count, generator=g)], src, lengths  # dst order shuffled


def reference_copy(dst, d_off, src, s_off, lengths):
    out = dst.clone()
    for d, s, n in zip(d_off.tolist(), s_off.tolist(), lengths.tolist()):
        out[d : d + n] = src[s : s + n]
    return out


IMPLS = {"torch": ops.torch_copy_intervals}
if ops.extension() is not None:
    IMPLS["csrc"] = ops.extension().copy_intervals


@pytest.mark.parametrize("impl", ["torch", "csrc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize(
    "count, max_len", [(5, 50), (300, 40), (3, 600_000)], ids=["few", "many", "huge"]
)
def test_copy_intervals_matches_a_slice_loop(impl, dtype, count, max_len):
    if impl not in IMPLS:
        pytest.skip("csrc extension not built (pip install --no-build-isolation -e .)")
    n_dst = count * (max_len + 4)
    d_off, s_off, lengths = random_intervals(2 * max_len + 10, n_dst, count, max_len, seed=count)
    src = (torch.randn(2 * max_len + 10) * 1000).to(dtype)
    dst = torch.zeros(n_dst, dtype=dtype)
    want = reference_copy(dst, d_off, src, s_off, lengths)
    IMPLS[impl](dst, d_off, src, s_off, lengths)
    assert torch.equal(dst, want)


@pytest.mark.parametrize("impl", ["torch", "csrc"])
def test_copy_of_matrix_blocks_matches_a_slice_loop(impl):
    """Regular runs (the rows of a column block, as realloc plans make) then irregular ones."""
    if impl not in IMPLS:
        pytest.skip("csrc extension not built (pip install --no-build-isolation -e .)")
    src = torch.randn(64 * 48)
    rows = torch.arange(64)
    # columns 16..40 of a 64 x 48 matrix into a 64 x 24 block; then every other row of
    # columns 0..8 into the rows of a second block; then three odd pieces
    s_off = torch.cat([rows * 48 + 16, rows[::2] * 48, torch.tensor([5, 900, 7])])
    d_off = torch.cat([rows * 24, 2000 + rows[:32] * 10, torch.tensor([2400, 2300, 2500])])
    lengths = torch.cat([torch.full((64,), 24), torch.full((32,), 8), torch.tensor([3, 50, 1])])
    dst = torch.zeros(2600)
    want = reference_copy(dst, d_off, src, s_off, lengths)
    IMPLS[impl](dst, d_off, src, s_off, lengths)
    assert torch.equal(dst, want)


def test_dispatching_ops_gather_and_scatter_invert_each_other():
    d_off, s_off, lengths = random_intervals(1000, 200 * 24, 200, 20, seed=1)
    buf = torch.randn(200 * 24)
    packed = ops.gather_intervals(buf, d_off, lengths)
    assert torch.equal(packed, torch.cat([buf[d : d + n] for d, n in zip(d_off, lengths)]))
    out = torch.zeros_like(buf)
    ops.scatter_intervals(out, d_off, lengths, packed)
    assert torch.equal(out, reference_copy(torch.zeros_like(buf), d_off, buf, d_off, lengths))


def test_bad_intervals_are_refused():
    buf = torch.zeros(10)
    one = torch.tensor([8])
    with pytest.raises(ValueError, match="outside dst"):
        ops.copy_intervals(buf, one, torch.zeros(20), torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="int64"):
        ops.copy_intervals(buf, one.int(), buf, one.int(), one.int())
    with pytest.raises(ValueError, match="one dtype"):
        ops.copy_intervals(buf, one, buf.double(), one, torch.tensor([1]))
