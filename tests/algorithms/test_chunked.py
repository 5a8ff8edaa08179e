"""Chunked log-probs and entropy equal the plain fp32 computation (values and gradients, fp32 and
bf16 logits), and keep nothing of size tokens x vocab in fp32 for the backward."""

import pytest
import torch

from realflow.algorithms import gather_packed_logprobs, packed_entropy
from realflow.algorithms.chunked import rows_entropy, rows_logprobs
from realflow.algorithms.packed import cu_seqlens_from_lens

LENS = [5, 1, 9, 4]
V = 37


def _batch(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENS)
    logits = (torch.randn(T, V, generator=g) * 3).to(dtype)
    ids = torch.randint(0, V, (T,), generator=g)
    return logits, ids, cu_seqlens_from_lens(LENS)


def _plain_rows_and_labels(ids, cu):
    """Rows predicting a token and their labels, by a loop over sequences."""
    rows, labels = [], []
    for i in range(len(cu) - 1):
        for t in range(int(cu[i]), int(cu[i + 1]) - 1):
            rows.append(t)
            labels.append(int(ids[t + 1]))
    return torch.tensor(rows), torch.tensor(labels)


def _plain_logprobs(logits, ids, cu, temperature):
    rows, labels = _plain_rows_and_labels(ids, cu)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # the full fp32 [T, V]
    return logp[rows, labels]


def _plain_entropy(logits, ids, cu, temperature):
    rows, _ = _plain_rows_and_labels(ids, cu)
    logp = torch.log_softmax(logits.float()[rows] / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _value_and_grad(fn, logits, upstream_seed=1):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed))
    (out * g).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_equal_the_plain_computation(dtype, chunk_size, temperature):
    logits, ids, cu = _batch(dtype)
    for chunked, plain in (
        (
            lambda x: gather_packed_logprobs(x, ids, cu, temperature, chunk_size),
            lambda x: _plain_logprobs(x, ids, cu, temperature),
        ),
        (
            lambda x: packed_entropy(x, cu, temperature, chunk_size),
            lambda x: _plain_entropy(x, ids, cu, temperature),
        ),
    ):
        got, got_grad = _value_and_grad(chunked, logits)
        want, want_grad = _value_and_grad(plain, logits)
        assert got.dtype == torch.float32 and got_grad.dtype == dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # fp32 gradients agree to rounding; bf16 ones are the same fp32 values rounded to bf16,
        # so they may differ by one bf16 step where the fp32 values sit near a rounding boundary
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(got_grad, want_grad, **tol)


def _saved_fp32_bytes(fn, logits) -> int:
    """Bytes of the fp32 tensors autograd keeps for the backward of `fn(logits)`, other than
    `logits` itself."""
    total = 0

    def pack(t):
        nonlocal total
        if t.dtype == torch.float32 and t.untyped_storage().data_ptr() != base:
            total += t.numel() * 4
        return t

    x = logits.detach().clone().requires_grad_(True)
    base = x.untyped_storage().data_ptr()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


def test_backward_keeps_no_fp32_tokens_by_vocab_tensor():
    T, vocab = 64, 1000
    logits = torch.randn(T, vocab).to(torch.bfloat16)
    rows = torch.arange(T)
    labels = torch.randint(0, vocab, (T,))
    full = T * vocab * 4
    # the reference: chunking only the forward keeps every chunk's fp32 copy for the backward
    plain = _saved_fp32_bytes(
        lambda x: torch.cat(
            [
                torch.log_softmax(x[s : s + 8].float(), -1).gather(1, labels[s : s + 8, None])
                for s in range(0, T, 8)
            ]
        ),
        logits,
    )
    assert plain >= full
    for fn in (
        lambda x: rows_logprobs(x, rows, labels, chunk_size=8),
        lambda x: rows_entropy(x, rows, chunk_size=8),
    ):
        assert _saved_fp32_bytes(fn, logits) <= 2 * T * 4  # a number or two per row


def test_bad_arguments_are_refused():
    logits, ids, cu = _batch(torch.float32)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gather_packed_logprobs(logits, ids, cu, temperature=0.0)
    with pytest.raises(ValueError, match=r"chunk_size \(0\) must be >= 1"):
        packed_entropy(logits, cu, chunk_size=0)
    with pytest.raises(ValueError, match=r"chunk_size \(0\) must be >= 1"):
        gather_packed_logprobs(logits, ids, cu, chunk_size=0)
    ids_msg = r"logits_TV has 19 rows, input_ids_T shape \(18,\), cu_seqlens_B1 covers 19: all"
    with pytest.raises(ValueError, match=ids_msg):
        gather_packed_logprobs(logits, ids[:-1], cu)
    with pytest.raises(ValueError, match="logits_TV has 19 rows but cu_seqlens_B1 covers 18"):
        packed_entropy(logits, cu_seqlens_from_lens([5, 1, 8, 4]))


@pytest.mark.cuda
def test_cuda_logprobs_match_the_cpu_reference_and_stay_under_one_fp32_copy():
    """On a GPU, a Qwen-sized vocab: values and gradients equal the plain fp32 computation on
    the CPU, and fwd + bwd allocate less than one fp32 [T, V] tensor beyond the logits and
    their gradient (the plain computation needs three)."""
    T, vocab = 4096, 151936
    g = torch.Generator().manual_seed(0)
    logits_cpu = torch.randn(T, vocab, generator=g, dtype=torch.bfloat16)
    ids = torch.randint(0, vocab, (T,), generator=g)
    cu = cu_seqlens_from_lens([1000, 96, 3000])
    upstream = torch.randn(T - 3, generator=torch.Generator().manual_seed(1))  # _value_and_grad's

    x = logits_cpu.cuda().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = gather_packed_logprobs(x, ids.cuda(), cu.cuda(), 0.9)
    (got * upstream.cuda()).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.grad.numel() * x.grad.element_size()
    assert extra < T * vocab * 4, f"{extra / 2**20:.0f} MiB beyond the logits and gradient"

    # the reference on the CPU: the whole fp32 log-softmax (5 GiB of host memory)
    want, want_grad = _value_and_grad(lambda y: _plain_logprobs(y, ids, cu, 0.9), logits_cpu)
    torch.testing.assert_close(got.detach().cpu(), want, rtol=1e-5, atol=1e-5)
    # GPU and CPU exp differ in the last fp32 bits: one bf16 step apart at most (torch's bf16 rtol)
    torch.testing.assert_close(x.grad.cpu(), want_grad, rtol=1.6e-2, atol=1e-5)
