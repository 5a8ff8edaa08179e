"""Tensor-parallel building blocks: communication with the right gradients, and sharded layers.

Megatron's scheme: activations entering a column-parallel projection are replicated on every
tp rank (`copy_to_tp`: identity forward, all-reduce of the gradient backward); a row-parallel
projection sums the partial products of its ranks (`reduce_from_tp`: all-reduce forward,
identity backward). Everything downstream of a reduction is computed identically on every tp
rank, so each rank's loss is the full loss and the gradients of replicated parameters agree.

Layers keep `nn.Linear` / `nn.Embedding` parameter names (`weight`, `bias`) so sharding works by
parameter name (see realflow.parallel.partition).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SumReplicaGrads(torch.autograd.Function):
    """Identity on a weight held by several tp ranks; backward sums its gradient over them.

    `index` is which of `n_copies` distinct blocks this rank's weight is; the gradient is
    all-reduced over the whole tp group in a buffer of every block, so ranks holding the same
    block add up.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, group: Any, index: int, n_blocks: int) -> torch.Tensor:
        ctx.group, ctx.index, ctx.n_blocks = group, index, n_blocks
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.new_zeros((ctx.n_blocks, *grad.shape))
        full[ctx.index] = grad
        dist.all_reduce(full, group=ctx.group)
        return full[ctx.index], None, None, None


def copy_to_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Identity forward; the gradient is summed over the tp group."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum over the tp group forward; identity backward."""
    return _ReduceFromTP.apply(x, group)


def all_reduce_max(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Elementwise max over the tp group of a tensor that needs no gradient."""
    out = x.detach().contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


class RowParallelLinear(nn.Linear):
    """`y = sum over tp ranks of x_local @ W_local^T, + bias`: weight (out, in / tp), bias
    (out,) replicated and added once after the reduction."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group: Any):
        super().__init__(in_local, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class ReplicatedHeadLinear(nn.Linear):
    """A column block (one kv head) held by several tp ranks: gradients summed over them."""

    def __init__(
        self, in_features: int, out_local: int, bias: bool, group: Any, index: int, n_blocks: int
    ):
        super().__init__(in_features, out_local, bias=bias)
        self.group, self.index, self.n_blocks = group, index, n_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sync = (self.group, self.index, self.n_blocks)
        w = _SumReplicaGrads.apply(self.weight, *sync)
        b = None if self.bias is None else _SumReplicaGrads.apply(self.bias, *sync)
        return F.linear(x, w, b)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_stop) of the embedding; ids outside give 0, then the tp group
    sums, so every rank gets the full embedding of every token."""

    def __init__(
        self,
        vocab_start: int,
        vocab_stop: int,
        dim: int,
        group: Any,
        _weight: torch.Tensor | None = None,
    ):
        super().__init__(vocab_stop - vocab_start, dim, _weight=_weight)
        self.vocab_start, self.vocab_stop, self.group = vocab_start, vocab_stop, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_stop)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        emb = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(emb, self.group)


class VocabShard:
    """Where a tp rank's slice of the vocab is: logits of an LM head under tensor parallelism
    are `logits_TVl` for vocab rows [start, stop) of `vocab_size`; `group` is the tp group."""

    def __init__(self, start: int, stop: int, vocab_size: int, group: Any, tp_size: int):
        self.start, self.stop, self.vocab_size = start, stop, vocab_size
        self.group, self.tp_size = group, tp_size

    def __repr__(self) -> str:
        return f"VocabShard([{self.start}, {self.stop}) of {self.vocab_size}, tp={self.tp_size})"
