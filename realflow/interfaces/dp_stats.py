"""Batch statistics over a data-parallel group: when each dp rank trains on a part of the batch,
the normalisations that read the whole batch (advantage whitening, a batch std, a value
normaliser's update) gather every rank's values first. Without a group (or in a group of one)
each function is its single-process form."""

from __future__ import annotations

from typing import Any

import torch

from realflow.algorithms import masked_whiten


def dp_cat(x: torch.Tensor, group: Any) -> tuple[torch.Tensor, int] | None:
    """(`x` (1-D) of every rank of the data-parallel `group` concatenated in rank order, where
    this rank's `x` starts in it); None without a group or in a group of one."""
    from realflow.engines.common import dp_world

    active, size = dp_world(group)
    if not active:
        return None
    every: list[Any] = [None] * size
    torch.distributed.all_gather_object(every, x.detach().cpu(), group=group)
    start = sum(len(t) for t in every[: torch.distributed.get_rank(group)])
    return torch.cat(every).to(x.device), start


def dp_masked_whiten(x_T: torch.Tensor, mask_T: torch.Tensor, group: Any) -> torch.Tensor:
    """`masked_whiten` with the mean and variance of the masked entries of every rank of the
    data-parallel `group` (the whole batch's, when each rank holds a part of it)."""
    keep = mask_T.bool()
    gathered = dp_cat(x_T[keep], group)
    if gathered is None:
        return masked_whiten(x_T, mask_T)
    every, start = gathered
    whitened = masked_whiten(every, torch.ones_like(every, dtype=torch.bool))
    out = torch.zeros_like(x_T)
    out[keep] = whitened[start : start + int(keep.sum())]
    return out


def dp_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """`x` (1-D) of every rank of `group` concatenated in rank order; `x` without a group."""
    gathered = dp_cat(x, group)
    return x if gathered is None else gathered[0]
