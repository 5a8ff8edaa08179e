"""Interval copies between flat buffers: the hot loop of parameter reallocation.

An interval list is three int64 1-D tensors of equal length: offsets into one buffer, offsets
into the other, and lengths (elements). Three operations:

    packed = gather_intervals(src, offsets, lengths)          # concatenation of the intervals
    scatter_intervals(dst, offsets, lengths, packed)          # inverse: write them back
    copy_intervals(dst, dst_offsets, src, src_offsets, lengths)

They run the C++ extension `realflow.parallel._interval_ops` (built from csrc/ at install time,
with a CUDA kernel when built against a CUDA torch with nvcc) when it imports, and otherwise a
pure-torch fallback with identical results (logged once). `REALFLOW_INTERVAL_OPS=torch` forces
the fallback.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger(__name__)


@functools.cache
def extension() -> ModuleType | None:
    """The compiled extension, or None (the reason is logged once)."""
    if os.environ.get("REALFLOW_INTERVAL_OPS", "auto") == "torch":
        logger.info("interval ops: pure-torch fallback (REALFLOW_INTERVAL_OPS=torch)")
        return None
    try:
        from realflow.parallel import _interval_ops
    except ImportError as e:
        logger.warning(
            "interval ops: the csrc extension is not built (%s); using the pure-torch fallback. "
            "Build it with `pip install --no-build-isolation -e .` (needs a C++ compiler).",
            e,
        )
        return None
    return _interval_ops


def _check(name: str, buf: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor) -> None:
    if buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(buf.shape)}")
    if offsets.dtype != torch.int64 or lengths.dtype != torch.int64:
        raise ValueError(f"offsets and lengths must be int64, got {offsets.dtype}, {lengths.dtype}")
    if offsets.shape != lengths.shape or offsets.dim() != 1:
        raise ValueError(
            f"offsets {tuple(offsets.shape)} and lengths {tuple(lengths.shape)} must be 1-D and equal"
        )
    if offsets.numel() and (
        int(offsets.min()) < 0
        or int(lengths.min()) < 0
        or int((offsets + lengths).max()) > buf.numel()
    ):
        raise ValueError(f"an interval falls outside {name} ({buf.numel()} elements)")


def _packed_offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(lengths, 0) - lengths


def _regular_runs(d_off: torch.Tensor, s_off: torch.Tensor, lengths: torch.Tensor) -> list:
    """Split the interval list into runs of equal length whose offsets advance by a constant
    stride on both sides: [(first, count, length, src stride, dst stride)]."""
    n = lengths.numel()
    brk = torch.ones(n, dtype=torch.bool)
    if n > 2:
        ds, dd = s_off.diff(), d_off.diff()
        brk[1:] = lengths[1:] != lengths[:-1]
        brk[2:] |= (ds[1:] != ds[:-1]) | (dd[1:] != dd[:-1])
    starts = brk.nonzero().squeeze(1).tolist() + [n]
    s_list, d_list, l_list = s_off.tolist(), d_off.tolist(), lengths.tolist()
    runs = []
    for a, b in zip(starts[:-1], starts[1:]):
        ss = s_list[a + 1] - s_list[a] if b - a > 1 else 0
        sd = d_list[a + 1] - d_list[a] if b - a > 1 else 0
        runs.append((a, b - a, l_list[a], ss, sd))
    return runs


def torch_copy_intervals(
    dst: torch.Tensor,
    dst_offsets: torch.Tensor,
    src: torch.Tensor,
    src_offsets: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """The pure-torch `copy_intervals` (no checks): one strided copy per run of regularly
    spaced equal intervals (the rows of a column block), else one slice copy per interval."""
    d_list, s_list = dst_offsets.tolist(), src_offsets.tolist()
    for a, count, n, ss, sd in _regular_runs(dst_offsets, src_offsets, lengths):
        if count > 1 and ss >= 0 and sd >= n:
            d_view = dst.as_strided((count, n), (sd, 1), dst.storage_offset() + d_list[a])
            s_view = src.as_strided((count, n), (ss, 1), src.storage_offset() + s_list[a])
            d_view.copy_(s_view)
            continue
        for i in range(a, a + count):
            dst.narrow(0, d_list[i], n).copy_(src.narrow(0, s_list[i], n))


def copy_intervals(
    dst: torch.Tensor,
    dst_offsets: torch.Tensor,
    src: torch.Tensor,
    src_offsets: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    """`dst[dst_offsets[i] : + lengths[i]] = src[src_offsets[i] : + lengths[i]]` for every i.
    Same dtype and device; intervals of `dst` must not overlap each other."""
    _check("dst", dst, dst_offsets, lengths)
    _check("src", src, src_offsets, lengths)
    if dst.dtype != src.dtype or dst.device != src.device:
        raise ValueError(
            f"copy_intervals needs one dtype and device, got {src.dtype}/{src.device} -> "
            f"{dst.dtype}/{dst.device}"
        )
    ext = extension()
    if ext is not None and (dst.device.type == "cpu" or ext.has_cuda()):
        ext.copy_intervals(dst, dst_offsets.cpu(), src, src_offsets.cpu(), lengths.cpu())
    else:
        torch_copy_intervals(dst, dst_offsets, src, src_offsets, lengths)


def gather_intervals(
    src: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """The intervals of `src` concatenated (a new 1-D tensor)."""
    out = torch.empty(int(lengths.sum()), dtype=src.dtype, device=src.device)
    copy_intervals(out, _packed_offsets(lengths), src, offsets, lengths)
    return out


def scatter_intervals(
    dst: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, packed: torch.Tensor
) -> None:
    """Write consecutive pieces of `packed` into the intervals of `dst` (inverse of gather)."""
    if packed.numel() != int(lengths.sum()):
        raise ValueError(f"packed has {packed.numel()} elements, intervals {int(lengths.sum())}")
    copy_intervals(dst, offsets, packed, _packed_offsets(lengths), lengths)
