"""The CUDA attention backends' logic on CPU: the bucketed fallback against a per-sequence loop,
what `auto` picks for each device / dtype / installed kernel, and the adapter to the varying
signatures of torch's `varlen_attn` (run against a reference kernel standing in for it)."""

from __future__ import annotations

import math

import pytest
import torch

from realflow.models import attention
from realflow.models.attention import PackedSeqs, bucket_length, resolve_attn_impl, varlen_attention

LENS = [1, 2, 3, 5, 7, 8, 9, 13, 33, 64, 100, 3, 1]


def reference_attention(q_THD, k_TKD, v_TKD, lens, scale):
    """Per sequence: softmax(q k^T * scale + causal mask) v, kv heads repeated, written out."""
    outs, start = [], 0
    group = q_THD.shape[1] // k_TKD.shape[1]
    for n in lens:
        q = q_THD[start : start + n]
        k, v = (x[start : start + n].repeat_interleave(group, dim=1) for x in (k_TKD, v_TKD))
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
        start += n
    return torch.cat(outs)


def packed_qkv(lens, h=4, kv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, n, d, generator=g, dtype=torch.float64) for n in (h, kv, kv))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return q, k, v, PackedSeqs.from_cu_seqlens(cu)


def test_bucket_lengths_hold_each_sequence_with_at_most_a_third_padding():
    n = torch.arange(1, 3000)
    b = bucket_length(n)
    assert bool((b >= n).all())
    assert bool((3 * (b - n) <= b).all())  # at most a third of a row is padding
    assert len(torch.unique(bucket_length(torch.tensor(LENS)))) < len(set(LENS))


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_bucketed_equals_per_sequence_reference_forward_and_backward(kv):
    q, k, v, seqs = packed_qkv(LENS, kv=kv)
    for x in (q, k, v):
        x.requires_grad_(True)
    scale = 8**-0.5
    got = varlen_attention(q, k, v, seqs, "sdpa_bucketed", scale)
    want = reference_attention(q, k, v, LENS, scale)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    w = torch.randn_like(got)
    g_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    g_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_bucketed_runs_one_sdpa_call_per_bucket_not_per_sequence(monkeypatch):
    calls = []
    sdpa = attention._sdpa
    monkeypatch.setattr(
        attention, "_sdpa", lambda *a, **kw: calls.append(a[0].shape) or sdpa(*a, **kw)
    )
    q, k, v, seqs = packed_qkv(LENS)
    varlen_attention(q, k, v, seqs, "sdpa_bucketed", 0.3)
    n_buckets = len(torch.unique(bucket_length(torch.tensor(LENS))))
    assert len(calls) == n_buckets < len(LENS)
    assert sum(shape[0] for shape in calls) == len(LENS)


CUDA, CPU = torch.device("cuda"), torch.device("cpu")
BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    "device, dtype, flash, varlen, want",
    [
        (CUDA, BF16, True, True, "flash"),
        (CUDA, BF16, False, True, "torch_varlen"),
        (CUDA, torch.float16, False, True, "torch_varlen"),
        (CUDA, BF16, False, False, "sdpa_bucketed"),
        (CUDA, FP32, True, True, "sdpa_bucketed"),  # the kernels take fp16/bf16 only
        (CPU, BF16, True, True, "sdpa_varlen"),
        (CPU, FP32, False, False, "sdpa_varlen"),
    ],
)
def test_auto_picks_by_device_dtype_and_installed_kernels(
    monkeypatch, device, dtype, flash, varlen, want
):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: flash)
    monkeypatch.setattr(attention, "torch_varlen_params", lambda: frozenset() if varlen else None)
    assert resolve_attn_impl("auto", device, dtype) == want


def test_kernel_backends_asked_for_where_they_cannot_run_are_errors(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    monkeypatch.setattr(attention, "torch_varlen_params", lambda: frozenset())
    assert resolve_attn_impl("torch_varlen", CUDA, BF16) == "torch_varlen"
    with pytest.raises(ValueError, match="'flash' needs fp16/bf16 CUDA.*importable=False"):
        resolve_attn_impl("flash", CUDA, BF16)
    with pytest.raises(ValueError, match="'torch_varlen' needs fp16/bf16 CUDA"):
        resolve_attn_impl("torch_varlen", CPU, BF16)
    with pytest.raises(ValueError, match="'torch_varlen' needs fp16/bf16 CUDA"):
        resolve_attn_impl("torch_varlen", CUDA, FP32)
    assert resolve_attn_impl("sdpa_bucketed", CPU, FP32) == "sdpa_bucketed"


def _reference_kernel(query, key, value, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
    """What flash's varlen kernel computes, for the signature variants below."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    lens = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max_q == max_k == max(lens) and causal
    if key.shape[1] != query.shape[1]:
        assert gqa, "the adapter must repeat kv heads when the kernel has no enable_gqa"
    return reference_attention(query, key, value, lens, scale)


def kernel_2_9(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None
):
    d = query.shape[-1]
    return _reference_kernel(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, d**-0.5, False
    )


def kernel_2_10(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
):
    causal = tuple(window_size) == (-1, 0)
    return _reference_kernel(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale, False
    )


def kernel_2_12(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    causal = tuple(window_size) == (-1, 0)
    return _reference_kernel(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal, scale, enable_gqa
    )


@pytest.mark.parametrize("kernel", [kernel_2_9, kernel_2_10, kernel_2_12])
def test_torch_varlen_adapter_passes_what_each_signature_takes(monkeypatch, kernel):
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    attention.torch_varlen_params.cache_clear()
    try:
        q, k, v, seqs = packed_qkv(LENS, h=4, kv=2)
        scale = 0.3  # not head_dim ** -0.5: the 2.9 kernel gets it folded into q
        got = varlen_attention(q, k, v, seqs, "torch_varlen", scale)
    finally:
        attention.torch_varlen_params.cache_clear()
    torch.testing.assert_close(got, reference_attention(q, k, v, LENS, scale), atol=1e-10, rtol=0)
    assert not math.isnan(float(got.sum()))
