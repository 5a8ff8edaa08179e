"""Causal attention over packed variable-length sequences, with interchangeable backends.

Every backend takes packed q/k/v (`q_THD`, `k_TKD`, `v_TKD`: T tokens, H query heads, K key/value
heads, D head dim; K divides H) and sequence boundaries `cu_seqlens_B1`, and returns `out_THD`
where each token attends only to earlier tokens of its own sequence.

Backends (name -> function in `ATTN_BACKENDS`):
  flash           flash_attn_varlen_func (CUDA fp16/bf16, flash-attn installed)
  torch_varlen    torch.nn.attention.varlen.varlen_attn (CUDA fp16/bf16, torch >= 2.9)
  sdpa_bucketed   sequences padded to a few length buckets, one batched causal SDPA call per
                  bucket (no Python loop over sequences); the CUDA fallback (fp32, no kernel)
  sdpa_varlen     one SDPA call per sequence (is_causal); the CPU default, see benchmarks/RESULTS.md
  sdpa_grouped    sequences of equal length batched into one SDPA call each
  sdpa_blockmask  one SDPA call over all tokens with a block-diagonal causal mask (O(T^2) memory)

`auto` (see `resolve_attn_impl`): on CUDA flash > torch_varlen > sdpa_bucketed, on CPU
sdpa_varlen.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CPU_DEFAULT_IMPL = "sdpa_varlen"


@dataclass
class PackedSeqs:
    """Boundaries of a packed batch, computed once per forward and shared by all layers.

    `cu_seqlens_B1` (int32, B+1) on the model's device; `seqlens` the same lengths as Python ints.
    """

    cu_seqlens_B1: torch.Tensor
    seqlens: list[int]
    max_seqlen: int
    # The gather plan of `sdpa_bucketed`, built by the first layer and reused by the others.
    bucket_plan: BucketPlan | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens_B1: torch.Tensor) -> PackedSeqs:
        cu = cu_seqlens_B1.to(torch.int32)
        lens = (cu[1:] - cu[:-1]).tolist()
        return cls(cu, lens, max(lens, default=0))

    def position_ids_T(self) -> torch.Tensor:
        """Position of each token inside its own sequence (restarts at 0), int64, shape (T,)."""
        device = self.cu_seqlens_B1.device
        lens = torch.tensor(self.seqlens, device=device, dtype=torch.long)
        starts = self.cu_seqlens_B1[:-1].long()
        total = int(sum(self.seqlens))
        return torch.arange(total, device=device) - torch.repeat_interleave(starts, lens)


@functools.cache
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def torch_varlen_params() -> frozenset[str] | None:
    """Keyword names of `torch.nn.attention.varlen.varlen_attn`, None when it does not import.

    Its signature changed between torch releases (2.9: `is_causal`; 2.10: `scale`,
    `window_size`; 2.12: `enable_gqa`), so `_torch_varlen` passes only what it accepts."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def resolve_attn_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend to run. `auto`: on CUDA, flash for fp16/bf16 when flash-attn is installed,
    else torch_varlen for fp16/bf16 when torch has it, else sdpa_bucketed (fp32); on any other
    device `sdpa_varlen` (the measured CPU choice)."""
    half = dtype in (torch.float16, torch.bfloat16)
    cuda = device.type == "cuda"
    if impl == "auto":
        if cuda and half and flash_attn_available():
            return "flash"
        if cuda and half and torch_varlen_params() is not None:
            return "torch_varlen"
        return "sdpa_bucketed" if cuda else CPU_DEFAULT_IMPL
    if impl not in ATTN_BACKENDS:
        raise ValueError(f"attn_impl {impl!r} is unknown; choose one of {['auto', *ATTN_BACKENDS]}")
    kernels = {
        "flash": flash_attn_available,
        "torch_varlen": lambda: torch_varlen_params() is not None,
    }
    if impl in kernels and not (cuda and half and kernels[impl]()):
        raise ValueError(
            f"attn_impl {impl!r} needs fp16/bf16 CUDA tensors and its kernel importable (device="
            f"{device}, dtype={dtype}, importable={kernels[impl]()}); use 'auto' or 'sdpa_bucketed'"
        )
    return impl


def _flash(q_THD, k_TKD, v_TKD, seqs: PackedSeqs, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = seqs.cu_seqlens_B1.to(device=q_THD.device, dtype=torch.int32)
    return flash_attn_varlen_func(
        q_THD,
        k_TKD,
        v_TKD,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=seqs.max_seqlen,
        max_seqlen_k=seqs.max_seqlen,
        softmax_scale=scale,
        causal=True,
    )


def _torch_varlen(q_THD, k_TKD, v_TKD, seqs: PackedSeqs, scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    params = torch_varlen_params()
    kw: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kw["scale"] = scale
    else:  # the kernel's scale is head_dim ** -0.5: fold any other scale into q
        q_THD = q_THD * (scale * q_THD.shape[-1] ** 0.5)
    groups = q_THD.shape[1] // k_TKD.shape[1]
    if groups > 1 and "enable_gqa" in params:
        kw["enable_gqa"] = True
    elif groups > 1:
        k_TKD = k_TKD.repeat_interleave(groups, dim=1)
        v_TKD = v_TKD.repeat_interleave(groups, dim=1)
    cu = seqs.cu_seqlens_B1.to(device=q_THD.device, dtype=torch.int32)
    m = seqs.max_seqlen
    return varlen_attn(q_THD, k_TKD, v_TKD, cu, cu, m, m, **kw)


def bucket_length(n_B: torch.Tensor) -> torch.Tensor:
    """The padded length of each sequence for `sdpa_bucketed`: the smallest of 1, 2, 3, 4, 6, 8,
    12, 16, 24... (2^k and 3 * 2^(k-1)) that holds it, so padding wastes at most a third."""
    p2_B = 2 ** torch.ceil(torch.log2(n_B.double())).long()
    three_q_B = 3 * p2_B // 4
    return torch.where((p2_B >= 4) & (n_B <= three_q_B), three_q_B, p2_B)


@dataclass
class BucketPlan:
    """For each length bucket: `index_NL` (token of row n, slot l; padding slots repeat the
    row's first token) and `real_K`, the flat (n * L + l) slots holding real tokens; `order_T`
    puts the buckets' real tokens back in packed order. Built on the host once per forward,
    moved to the device once; only integer indexing on the device (a boolean mask would sync)."""

    buckets: list[tuple[torch.Tensor, torch.Tensor]]
    order_T: torch.Tensor

    @classmethod
    def build(cls, seqs: PackedSeqs, device: torch.device) -> BucketPlan:
        n_B = torch.tensor(seqs.seqlens, dtype=torch.long)
        start_B = torch.cumsum(n_B, 0) - n_B
        len_B = bucket_length(n_B)
        buckets, token_ids = [], []
        for length in torch.unique(len_B).tolist():  # a few buckets, never one per sequence
            rows = (len_B == length).nonzero().squeeze(-1)
            slot_L = torch.arange(length)
            valid_NL = slot_L[None, :] < n_B[rows, None]
            index_NL = torch.where(valid_NL, start_B[rows, None] + slot_L, start_B[rows, None])
            real_K = valid_NL.flatten().nonzero().squeeze(-1)
            buckets.append((index_NL.to(device), real_K.to(device)))
            token_ids.append(index_NL[valid_NL])
        order_T = torch.argsort(torch.cat(token_ids))
        return cls(buckets, order_T.to(device))


def _sdpa_bucketed(q_THD, k_TKD, v_TKD, seqs: PackedSeqs, scale: float) -> torch.Tensor:
    # Right padding keeps `is_causal` exact for the real tokens: they come before every padding
    # slot of their row, so they never attend to one; padded rows' outputs are dropped.
    if seqs.bucket_plan is None or seqs.bucket_plan.order_T.device != q_THD.device:
        seqs.bucket_plan = BucketPlan.build(seqs, q_THD.device)
    outs = []
    for index_NL, real_K in seqs.bucket_plan.buckets:
        q, k, v = (x[index_NL].transpose(1, 2) for x in (q_THD, k_TKD, v_TKD))
        out_NLHD = _sdpa(q, k, v, scale).transpose(1, 2)
        outs.append(out_NLHD.flatten(0, 1)[real_K])
    return torch.cat(outs)[seqs.bucket_plan.order_T]


def _sdpa(q_BHLD, k_BKLD, v_BKLD, scale, mask=None) -> torch.Tensor:
    gqa = q_BHLD.shape[1] != k_BKLD.shape[1]
    return F.scaled_dot_product_attention(
        q_BHLD,
        k_BKLD,
        v_BKLD,
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=gqa,
    )


def _sdpa_varlen(q_THD, k_TKD, v_TKD, seqs: PackedSeqs, scale: float) -> torch.Tensor:
    if len(seqs.seqlens) == 1:
        out = _sdpa(
            q_THD.transpose(0, 1)[None],
            k_TKD.transpose(0, 1)[None],
            v_TKD.transpose(0, 1)[None],
            scale,
        )
        return out[0].transpose(0, 1)
    outs = []
    # torch.split, not slicing: its backward is one concatenation instead of a zero-filled
    # full-size gradient per sequence.
    for q, k, v in zip(
        q_THD.split(seqs.seqlens), k_TKD.split(seqs.seqlens), v_TKD.split(seqs.seqlens)
    ):
        out = _sdpa(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def _sdpa_grouped(q_THD, k_TKD, v_TKD, seqs: PackedSeqs, scale: float) -> torch.Tensor:
    device = q_THD.device
    starts = seqs.cu_seqlens_B1[:-1].tolist()
    by_len: dict[int, list[int]] = {}
    for s, n in zip(starts, seqs.seqlens):
        by_len.setdefault(n, []).append(s)
    out = torch.empty_like(q_THD)
    for n, group in by_len.items():
        if n == 0:
            continue
        idx_NL = torch.tensor(group, device=device)[:, None] + torch.arange(n, device=device)
        q = q_THD[idx_NL].transpose(1, 2)
        k = k_TKD[idx_NL].transpose(1, 2)
        v = v_TKD[idx_NL].transpose(1, 2)
        out[idx_NL] = _sdpa(q, k, v, scale).transpose(1, 2)
    return out


def _sdpa_blockmask(q_THD, k_TKD, v_TKD, seqs: PackedSeqs, scale: float) -> torch.Tensor:
    device = q_THD.device
    lens = torch.tensor(seqs.seqlens, device=device)
    seq_id_T = torch.repeat_interleave(torch.arange(len(seqs.seqlens), device=device), lens)
    pos_T = torch.arange(q_THD.shape[0], device=device)
    mask_TT = (seq_id_T[:, None] == seq_id_T[None, :]) & (pos_T[:, None] >= pos_T[None, :])
    out = _sdpa(
        q_THD.transpose(0, 1)[None],
        k_TKD.transpose(0, 1)[None],
        v_TKD.transpose(0, 1)[None],
        scale,
        mask=mask_TT,
    )
    return out[0].transpose(0, 1)


ATTN_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "flash": _flash,
    "torch_varlen": _torch_varlen,
    "sdpa_bucketed": _sdpa_bucketed,
    "sdpa_varlen": _sdpa_varlen,
    "sdpa_grouped": _sdpa_grouped,
    "sdpa_blockmask": _sdpa_blockmask,
}


def varlen_attention(
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    seqs: PackedSeqs,
    impl: str,
    scale: float,
) -> torch.Tensor:
    """Causal attention inside each packed sequence; `impl` is a resolved backend name."""
    return ATTN_BACKENDS[impl](q_THD, k_TKD, v_TKD, seqs, scale)


def decode_attention(
    q_BHD: torch.Tensor,
    k_cache_BKLD: torch.Tensor,
    v_cache_BKLD: torch.Tensor,
    mask_B11L: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One new query token per sequence against its cached keys; returns `out_BHD`.

    The cache is laid out per sequence, padded to the longest active one (`L`); `mask_B11L`
    (bool) marks the valid slots of each row. Grouped-query heads are folded into the query
    length axis, so K/V are never repeated.
    """
    b, h, d = q_BHD.shape
    kv = k_cache_BKLD.shape[1]
    q_BKGD = q_BHD.view(b, kv, h // kv, d)
    out = F.scaled_dot_product_attention(
        q_BKGD, k_cache_BKLD, v_cache_BKLD, attn_mask=mask_B11L, scale=scale
    )
    return out.reshape(b, h, d)
