"""Log-probs, entropy and cross-entropy over vocab-parallel logits, never gathering the vocab.

Under tensor parallelism the LM head gives each tp rank `logits_NVl`: the columns
[shard.start, shard.stop) of the full `logits_NV`. The functions below combine per-rank partial
results with all-reduces of N numbers (max, sum of exp, picked logit), so nothing of size
N x V is ever communicated, and they are differentiable: each rank receives the gradient of its
own logit columns. Every rank returns the same full result.

`gather_packed_logprobs(..., shard=None)` is the single-process `realflow.algorithms` function;
with a `VocabShard` it is the vocab-parallel one, with the same contract.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from realflow.algorithms.packed import gather_packed_logprobs as _gather_full
from realflow.algorithms.packed import shifted_cu_seqlens
from realflow.parallel.tp import VocabShard, all_reduce_max, reduce_from_tp


def _shifted(logits_NVl: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Logits minus the row max over the whole vocab (a constant: it needs no gradient)."""
    m_N = all_reduce_max(logits_NVl.max(dim=-1).values, shard.group)
    return logits_NVl - m_N[:, None]


def vocab_parallel_logprobs(
    logits_NVl: torch.Tensor, labels_N: torch.Tensor, shard: VocabShard
) -> torch.Tensor:
    """`log_softmax(logits_NV)[n, labels_N[n]]` (float32) from each rank's vocab columns."""
    x = _shifted(logits_NVl.float(), shard)
    inside = (labels_N >= shard.start) & (labels_N < shard.stop)
    local = (labels_N - shard.start).masked_fill(~inside, 0).long()
    picked_N = x.gather(1, local[:, None]).squeeze(1).masked_fill(~inside, 0.0)
    sums = reduce_from_tp(torch.stack([x.exp().sum(-1), picked_N]), shard.group)
    return sums[1] - sums[0].log()


def vocab_parallel_entropy(logits_NVl: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Entropy of `softmax(logits_NV)` per row (float32) from each rank's vocab columns."""
    x = _shifted(logits_NVl.float(), shard)
    e = x.exp()
    sums = reduce_from_tp(torch.stack([e.sum(-1), (e * x).sum(-1)]), shard.group)
    return sums[0].log() - sums[1] / sums[0]


def vocab_parallel_cross_entropy(
    logits_NVl: torch.Tensor, labels_N: torch.Tensor, shard: VocabShard
) -> torch.Tensor:
    """Per-row cross-entropy `-log p(label)` (float32), reduction left to the caller."""
    return -vocab_parallel_logprobs(logits_NVl, labels_N, shard)


def gather_vocab(logits_NVl: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The full `logits_NV` on every tp rank (for sampling a few rows; shards may be uneven)."""
    width = -(-shard.vocab_size // shard.tp_size)  # the widest shard
    padded = logits_NVl.new_zeros(logits_NVl.shape[0], width)
    padded[:, : logits_NVl.shape[1]] = logits_NVl
    parts = [torch.empty_like(padded) for _ in range(shard.tp_size)]
    dist.all_gather(parts, padded.contiguous(), group=shard.group)
    base, extra = divmod(shard.vocab_size, shard.tp_size)
    return torch.cat([p[:, : base + (r < extra)] for r, p in enumerate(parts)], dim=1)


def _next_token_rows(cu_seqlens_B1: torch.Tensor, n_rows: int, device) -> torch.Tensor:
    keep = torch.ones(n_rows, dtype=torch.bool, device=device)
    keep[cu_seqlens_B1[1:].long() - 1] = False
    return keep.nonzero().squeeze(1)


def gather_packed_logprobs(
    logits_TV: torch.Tensor,
    input_ids_T: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 2048,
    shard: VocabShard | None = None,
) -> torch.Tensor:
    """`logprobs_T1` of each next token within each packed sequence (see
    `realflow.algorithms.packed.gather_packed_logprobs`); with `shard`, `logits_TV` holds this
    rank's vocab columns and the result is the same on every tp rank."""
    if shard is None:
        return _gather_full(logits_TV, input_ids_T, cu_seqlens_B1, temperature, chunk_size)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    T = logits_TV.shape[0]
    if input_ids_T.shape != (T,) or int(cu_seqlens_B1[-1]) != T:
        raise ValueError(
            f"logits_TV has {T} rows, input_ids_T shape {tuple(input_ids_T.shape)}, "
            f"cu_seqlens_B1 covers {int(cu_seqlens_B1[-1])}: all must agree"
        )
    shifted_cu_seqlens(cu_seqlens_B1)  # validates lengths >= 1
    rows = _next_token_rows(cu_seqlens_B1, T, logits_TV.device)
    labels = input_ids_T.long()[rows + 1]
    out = []
    for s in range(0, rows.numel(), chunk_size):
        x = logits_TV.index_select(0, rows[s : s + chunk_size]).float()
        if temperature != 1.0:
            x = x / temperature
        out.append(vocab_parallel_logprobs(x, labels[s : s + chunk_size], shard))
    if not out:
        return logits_TV.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)


def packed_entropy(
    logits_TV: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 2048,
    shard: VocabShard | None = None,
) -> torch.Tensor:
    """`entropy_T1`: entropy of each next-token distribution (the rows `gather_packed_logprobs`
    uses), float32, chunked; vocab-parallel with `shard`."""
    rows = _next_token_rows(cu_seqlens_B1, logits_TV.shape[0], logits_TV.device)
    out = []
    for s in range(0, rows.numel(), chunk_size):
        x = logits_TV.index_select(0, rows[s : s + chunk_size]).float() / temperature
        if shard is None:
            logp = torch.log_softmax(x, dim=-1)
            out.append(-(logp.exp() * logp).sum(-1))
        else:
            out.append(vocab_parallel_entropy(x, shard))
    if not out:
        return logits_TV.new_zeros(0, dtype=torch.float32)
    return torch.cat(out)
