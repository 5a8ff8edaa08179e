"""Log-probs and entropy of some rows of a logits matrix, in chunks of rows, with a backward that
recomputes each chunk: no tensor of shape tokens x vocab in fp32 ever exists.

A plain `logits.float().log_softmax(-1)` upcasts the whole `[T, V]` matrix; chunking only the
forward does not help training, since autograd then keeps every chunk's fp32 copy for the
backward (the same `T x V x 4` bytes). These functions save only the logits as they came (model
dtype, alive anyway) and one fp32 number per row, and in the backward rebuild one fp32 chunk at a
time, writing its gradient into a tensor of the logits' dtype (the gradient the plain computation
gives, since its fp32 gradient is cast to the logits' dtype too).

Peak extra memory: about 2.5 fp32 chunks (a chunk is `chunk_rows x V x 4` bytes), whatever the
token count, plus the `[T, V]` gradient in the logits' dtype that any backward makes.
`chunk_rows(V)` keeps a chunk near `CHUNK_ELEMENTS` values (256 MiB in fp32). Measured on CPU
(benchmarks/bench_logprob_memory.py, peak RSS of forward + backward above bf16 logits, vocab
32000): 4096 tokens 1506 MiB plain vs 880 chunked, 8192 tokens 3005 vs 1148 MiB (of which
500 MiB is the bf16 gradient).

Cross-entropy is `-logprobs`; the SFT loss uses it that way.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_ELEMENTS = 2**26  # values of one fp32 chunk: 256 MiB


def chunk_rows(vocab: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: `chunk_size`, or as many as fit in CHUNK_ELEMENTS values (at least 1)."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size ({chunk_size}) must be >= 1")
        return chunk_size
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def _chunk(
    logits_TV: torch.Tensor, rows_N: torch.Tensor, s: int, n: int, temperature: float
) -> torch.Tensor:
    """fp32 `logits[rows[s:s+n]] / temperature`."""
    x = logits_TV.index_select(0, rows_N[s : s + n]).float()
    return x.div_(temperature) if temperature != 1.0 else x


class _Logprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits_TV, rows_N, labels_N, temperature, n):  # type: ignore[override]
        out_N = logits_TV.new_empty(rows_N.numel(), dtype=torch.float32)
        lse_N = torch.empty_like(out_N)
        for s in range(0, rows_N.numel(), n):
            x = _chunk(logits_TV, rows_N, s, n, temperature)
            lse_N[s : s + n] = torch.logsumexp(x, dim=-1)
            out_N[s : s + n] = x.gather(1, labels_N[s : s + n, None]).squeeze(1) - lse_N[s : s + n]
        ctx.save_for_backward(logits_TV, rows_N, labels_N, lse_N)
        ctx.temperature, ctx.n = temperature, n
        return out_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_N):  # type: ignore[override]
        logits_TV, rows_N, labels_N, lse_N = ctx.saved_tensors
        grad_TV = torch.zeros_like(logits_TV)
        n, temperature = ctx.n, ctx.temperature
        for s in range(0, rows_N.numel(), n):
            x = _chunk(logits_TV, rows_N, s, n, temperature)
            g = g_N[s : s + n, None].float()
            # d(x[label] - lse)/dx = onehot(label) - softmax(x); in place: one fp32 chunk
            gx = x.sub_(lse_N[s : s + n, None]).exp_().mul_(-g)
            gx.scatter_add_(1, labels_N[s : s + n, None], g)
            if temperature != 1.0:
                gx.div_(temperature)
            grad_TV.index_copy_(0, rows_N[s : s + n], gx.to(grad_TV.dtype))
        return grad_TV, None, None, None, None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits_TV, rows_N, temperature, n):  # type: ignore[override]
        out_N = logits_TV.new_empty(rows_N.numel(), dtype=torch.float32)
        lse_N = torch.empty_like(out_N)
        for s in range(0, rows_N.numel(), n):
            x = _chunk(logits_TV, rows_N, s, n, temperature)
            lse_N[s : s + n] = torch.logsumexp(x, dim=-1)
            logp = x.sub_(lse_N[s : s + n, None])
            out_N[s : s + n] = -(logp.exp().mul_(logp)).sum(-1)
        ctx.save_for_backward(logits_TV, rows_N, lse_N, out_N)
        ctx.temperature, ctx.n = temperature, n
        return out_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_N):  # type: ignore[override]
        logits_TV, rows_N, lse_N, h_N = ctx.saved_tensors
        grad_TV = torch.zeros_like(logits_TV)
        n, temperature = ctx.n, ctx.temperature
        for s in range(0, rows_N.numel(), n):
            logp = _chunk(logits_TV, rows_N, s, n, temperature).sub_(lse_N[s : s + n, None])
            # dH/dx_j = -p_j (log p_j + H)
            gx = logp.exp().mul_(logp.add_(h_N[s : s + n, None]))
            gx.mul_(g_N[s : s + n, None].float().neg())
            if temperature != 1.0:
                gx.div_(temperature)
            grad_TV.index_copy_(0, rows_N[s : s + n], gx.to(grad_TV.dtype))
        return grad_TV, None, None, None


def rows_logprobs(
    logits_TV: torch.Tensor,
    rows_N: torch.Tensor,
    labels_N: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`log_softmax(logits_TV[rows_N] / temperature)[n, labels_N[n]]` as float32 `[N]`, in chunks
    of rows. Differentiable with respect to `logits_TV`; `rows_N` must not repeat a row."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = chunk_rows(logits_TV.shape[-1], chunk_size)
    return _Logprobs.apply(logits_TV, rows_N.long(), labels_N.long(), float(temperature), n)


def rows_entropy(
    logits_TV: torch.Tensor,
    rows_N: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Entropy of `softmax(logits_TV[rows_N] / temperature)` per row, float32 `[N]`, in chunks
    of rows. Differentiable with respect to `logits_TV`; `rows_N` must not repeat a row."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = chunk_rows(logits_TV.shape[-1], chunk_size)
    return _Entropy.apply(logits_TV, rows_N.long(), float(temperature), n)
