"""Advantage estimators: GAE over packed answer spans (PPO) and group-normalised scores (GRPO)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from realflow.algorithms.packed import (
    check_same_shape,
    cu_seqlens_from_lens,
    segment_ids,
    segment_sum,
    shifted_cu_seqlens,
)


def _to_padded(
    x_T1: torch.Tensor,
    seg_M: torch.Tensor,
    rank_M: torch.Tensor,
    mask_T1: torch.Tensor,
    shape: tuple[int, int],
) -> torch.Tensor:
    out = x_T1.new_zeros(shape)
    out[seg_M, rank_M] = x_T1[mask_T1]
    return out


@torch.no_grad()
def gae_packed(
    rewards_T1: torch.Tensor,
    values_T1: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    bootstrap_B: torch.Tensor,
    gamma: float,
    lam: float,
    loss_mask_T1: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the answer span of each packed sequence.

    Within each sequence the positions where ``loss_mask_T1`` is set (the answer span) are the
    time steps, in order. For step t: ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * A_{t+1}``; after the last answer step ``V = bootstrap_B[i]``
    and ``A = 0``. ``bootstrap_B`` is 0 for sequences that ended with EOS and the critic's value of
    the final state for truncated ones (see ``packed.split_critic_values``).

    Args: ``rewards_T1``, ``values_T1`` (V(s_t) per T1 position), ``loss_mask_T1`` all ``[T1]``;
    ``cu_seqlens_B1`` describes the full sequences (L tokens each, T1 = sum(L - 1)).
    Returns ``(advantages_T1, returns_T1)`` with ``returns = advantages + values`` on answer
    positions; both are 0 on prompt positions. Computed in at least float32, no gradient.
    """
    check_same_shape("rewards_T1", rewards_T1, "values_T1", values_T1)
    check_same_shape("rewards_T1", rewards_T1, "loss_mask_T1", loss_mask_T1)
    cu1 = shifted_cu_seqlens(cu_seqlens_B1)
    B = cu1.numel() - 1
    if int(cu1[-1]) != rewards_T1.shape[0] or bootstrap_B.shape != (B,):
        raise ValueError(
            f"rewards_T1 has {rewards_T1.shape[0]} entries and bootstrap_B shape {tuple(bootstrap_B.shape)}; "
            f"cu_seqlens_B1 describes {int(cu1[-1])} T1 positions in {B} sequences"
        )
    dtype = torch.promote_types(
        torch.promote_types(rewards_T1.dtype, values_T1.dtype), torch.float32
    )
    mask = loss_mask_T1.bool()
    seg = segment_ids(cu1)
    n_ans_B = segment_sum(mask.long(), cu1)
    start_B = torch.cumsum(n_ans_B, 0) - n_ans_B
    rank = torch.cumsum(mask.long(), 0) - 1 - start_B[seg]
    seg_M, rank_M = seg[mask], rank[mask]
    max_a = int(n_ans_B.max()) if B else 0

    r_BA = _to_padded(rewards_T1.to(dtype), seg_M, rank_M, mask, (B, max_a))
    v_BA = _to_padded(values_T1.to(dtype), seg_M, rank_M, mask, (B, max_a + 1))
    v_BA[torch.arange(B, device=v_BA.device), n_ans_B] = bootstrap_B.to(dtype)
    adv_BA = torch.zeros_like(r_BA)
    last = r_BA.new_zeros(B)
    for t in range(max_a - 1, -1, -1):
        delta = r_BA[:, t] + gamma * v_BA[:, t + 1] - v_BA[:, t]
        last = (delta + gamma * lam * last) * (n_ans_B > t)
        adv_BA[:, t] = last

    adv_T1 = rewards_T1.new_zeros(rewards_T1.shape, dtype=dtype)
    ret_T1 = torch.zeros_like(adv_T1)
    adv_T1[mask] = adv_BA[seg_M, rank_M]
    ret_T1[mask] = adv_BA[seg_M, rank_M] + v_BA[seg_M, rank_M]
    return adv_T1, ret_T1


def group_normalized_advantages(
    scores_B: torch.Tensor,
    group_sizes: Sequence[int] | torch.Tensor,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    unbiased: bool = True,
) -> torch.Tensor:
    """GRPO advantages ``(score - group mean) / (group std + eps)`` per sequence: ``adv_B``.

    ``scores_B`` holds consecutive groups (answers to the same prompt) of ``group_sizes`` entries.
    ``scale_by_std=False`` only subtracts the group mean (Dr. GRPO). The std is unbiased (n-1) by
    default; a group of one has std 0, and a group of equal scores has advantage exactly 0.
    Broadcast to tokens with ``packed.broadcast_to_tokens``.
    """
    sizes = torch.as_tensor(group_sizes, dtype=torch.int64, device=scores_B.device)
    if sizes.dim() != 1 or int(sizes.sum()) != scores_B.shape[0] or bool((sizes < 1).any()):
        raise ValueError(
            f"group_sizes must be >= 1 and sum to len(scores_B) ({scores_B.shape[0]}), got {sizes.tolist()}"
        )
    cu = cu_seqlens_from_lens(sizes, device=scores_B.device)
    seg = segment_ids(cu)
    x = scores_B.to(torch.promote_types(scores_B.dtype, torch.float32))
    # Centred on each group's first score, so that a group of equal scores is exactly 0 (a float
    # sum of n equal values over n is not the value, and / (std + eps) would magnify the residue).
    d = x - x[cu[:-1]][seg]
    mean_G = segment_sum(d, cu) / sizes
    centered = d - mean_G[seg]
    if not scale_by_std:
        return centered
    denom_G = (sizes - 1).clamp_min(1) if unbiased else sizes
    std_G = torch.sqrt(segment_sum(centered**2, cu) / denom_G)
    return centered / (std_G[seg] + eps)
