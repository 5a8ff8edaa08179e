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

Tensor parallelism: with `shard` (a `realflow.parallel.tp.VocabShard`), `logits_TV` holds this
rank's vocab columns [shard.start, shard.stop) and each chunk all-reduces N numbers per row over
`shard.group` (max, sum of exp, picked logit / sum of p*x); the full vocab is never gathered.
The saved `lse` is the global one, so the backward is local (each rank gets the gradient of its
own columns) and the result is the same on every tp rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

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


def _local_labels(labels_N: torch.Tensor, shard: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each label in this rank's vocab slice (0 when outside), whether inside)."""
    if shard is None:
        return labels_N, torch.ones_like(labels_N, dtype=torch.bool)
    inside = (labels_N >= shard.start) & (labels_N < shard.stop)
    return (labels_N - shard.start).masked_fill(~inside, 0), inside


def _parallel_lse(x: torch.Tensor, extra_N: torch.Tensor, shard: Any, exp_weighted: bool):
    """(global logsumexp of the rows of `x`, the tp sum of `extra_N`, the tp sum of
    `sum_j p_j x_j * S` when `exp_weighted`) over the vocab columns of every tp rank."""
    m_N = x.max(dim=-1).values
    dist.all_reduce(m_N, op=dist.ReduceOp.MAX, group=shard.group)
    e = (x - m_N[:, None]).exp_()
    parts = [e.sum(-1), extra_N]
    if exp_weighted:
        parts.append((e * x).sum(-1))
    sums = torch.stack(parts)
    dist.all_reduce(sums, group=shard.group)
    return m_N + sums[0].log(), sums[0], sums[1:]


class _Logprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits_TV, rows_N, labels_N, temperature, n, shard):  # type: ignore[override]
        out_N = logits_TV.new_empty(rows_N.numel(), dtype=torch.float32)
        lse_N = torch.empty_like(out_N)
        local_N, inside_N = _local_labels(labels_N, shard)
        for s in range(0, rows_N.numel(), n):
            x = _chunk(logits_TV, rows_N, s, n, temperature)
            picked = x.gather(1, local_N[s : s + n, None]).squeeze(1)
            if shard is None:
                lse_N[s : s + n] = torch.logsumexp(x, dim=-1)
            else:
                picked = picked.masked_fill(~inside_N[s : s + n], 0.0)
                lse, _, (picked,) = _parallel_lse(x, picked, shard, exp_weighted=False)
                lse_N[s : s + n] = lse
            out_N[s : s + n] = picked - lse_N[s : s + n]
        ctx.save_for_backward(logits_TV, rows_N, local_N, inside_N, lse_N)
        ctx.temperature, ctx.n = temperature, n
        return out_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_N):  # type: ignore[override]
        logits_TV, rows_N, local_N, inside_N, lse_N = ctx.saved_tensors
        grad_TV = torch.zeros_like(logits_TV)
        n, temperature = ctx.n, ctx.temperature
        for s in range(0, rows_N.numel(), n):
            x = _chunk(logits_TV, rows_N, s, n, temperature)
            g = g_N[s : s + n, None].float()
            # d(x[label] - lse)/dx = onehot(label) - softmax(x); in place: one fp32 chunk
            gx = x.sub_(lse_N[s : s + n, None]).exp_().mul_(-g)
            gx.scatter_add_(1, local_N[s : s + n, None], g * inside_N[s : s + n, None])
            if temperature != 1.0:
                gx.div_(temperature)
            grad_TV.index_copy_(0, rows_N[s : s + n], gx.to(grad_TV.dtype))
        return grad_TV, None, None, None, None, None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits_TV, rows_N, temperature, n, shard):  # type: ignore[override]
        out_N = logits_TV.new_empty(rows_N.numel(), dtype=torch.float32)
        lse_N = torch.empty_like(out_N)
        for s in range(0, rows_N.numel(), n):
            x = _chunk(logits_TV, rows_N, s, n, temperature)
            if shard is None:
                lse_N[s : s + n] = torch.logsumexp(x, dim=-1)
                logp = x.sub_(lse_N[s : s + n, None])
                out_N[s : s + n] = -(logp.exp().mul_(logp)).sum(-1)
                continue
            # H = lse - sum_j p_j x_j, with p_j = e_j / S over every rank's columns
            lse, total, (_, ex) = _parallel_lse(x, x.new_zeros(x.shape[0]), shard, True)
            lse_N[s : s + n] = lse
            out_N[s : s + n] = lse - ex / total
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
        return grad_TV, None, None, None, None


def rows_logprobs(
    logits_TV: torch.Tensor,
    rows_N: torch.Tensor,
    labels_N: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    shard: Any = None,
) -> torch.Tensor:
    """`log_softmax(logits_TV[rows_N] / temperature)[n, labels_N[n]]` as float32 `[N]`, in chunks
    of rows. Differentiable with respect to `logits_TV`; `rows_N` must not repeat a row. With
    `shard` (a VocabShard), `logits_TV` are this tp rank's vocab columns (module docstring)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = chunk_rows(logits_TV.shape[-1], chunk_size)
    args = (rows_N.long(), labels_N.long(), float(temperature), n, shard)
    return _Logprobs.apply(logits_TV, *args)


def rows_entropy(
    logits_TV: torch.Tensor,
    rows_N: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    shard: Any = None,
) -> torch.Tensor:
    """Entropy of `softmax(logits_TV[rows_N] / temperature)` per row, float32 `[N]`, in chunks
    of rows. Differentiable with respect to `logits_TV`; `rows_N` must not repeat a row. With
    `shard` (a VocabShard), `logits_TV` are this tp rank's vocab columns (module docstring)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = chunk_rows(logits_TV.shape[-1], chunk_size)
    return _Entropy.apply(logits_TV, rows_N.long(), float(temperature), n, shard)
