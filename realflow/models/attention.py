"""Causal attention over packed variable-length sequences, with interchangeable backends.

Every backend takes packed q/k/v (`q_THD`, `k_TKD`, `v_TKD`: T tokens, H query heads, K key/value
heads, D head dim; K divides H) and sequence boundaries `cu_seqlens_B1`, and returns `out_THD`
where each token attends only to earlier tokens of its own sequence.

Backends (name -> function in `ATTN_BACKENDS`):
  flash           flash_attn_varlen_func (CUDA, flash-attn installed)
  sdpa_varlen     one SDPA call per sequence (is_causal); the CPU default, see benchmarks/RESULTS.md
  sdpa_grouped    sequences of equal length batched into one SDPA call each
  sdpa_blockmask  one SDPA call over all tokens with a block-diagonal causal mask (O(T^2) memory)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

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


def resolve_attn_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend to run: `auto` picks flash for fp16/bf16 CUDA tensors when flash-attn is
    installed, else `sdpa_varlen` (the measured CPU choice)."""
    half = dtype in (torch.float16, torch.bfloat16)
    if impl == "auto":
        if device.type == "cuda" and half and flash_attn_available():
            return "flash"
        return CPU_DEFAULT_IMPL
    if impl not in ATTN_BACKENDS:
        raise ValueError(f"attn_impl {impl!r} is unknown; choose one of {['auto', *ATTN_BACKENDS]}")
    if impl == "flash" and (device.type != "cuda" or not half or not flash_attn_available()):
        raise ValueError(
            f"attn_impl 'flash' needs fp16/bf16 CUDA tensors and flash-attn installed (device="
            f"{device}, dtype={dtype}, flash_attn importable={flash_attn_available()}); use 'auto' "
            "or 'sdpa_varlen'"
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
