"""Critic-free policy-gradient math: the baselines, reward shaping and loss aggregations of RLOO,
REINFORCE++, DAPO and Dr. GRPO.

Per-sequence inputs are ``[B]`` tensors (one entry per sequence; consecutive groups of answers to
one prompt where a group matters), per-token inputs ``[T1]`` tensors in the shifted log-prob
space with ``cu_seqlens_B1`` describing the full sequences (see ``packed``).

The clipped loss these algorithms share, and its aggregations, are ``ppo.policy_loss`` and
``ppo.aggregate_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from realflow.algorithms.advantages import group_normalized_advantages
from realflow.algorithms.kl import kl_estimate
from realflow.algorithms.normalize import masked_whiten
from realflow.algorithms.packed import (
    check_same_shape,
    cu_seqlens_from_lens,
    segment_ids,
    segment_sum,
    shifted_cu_seqlens,
)

# ---- groups -------------------------------------------------------------------------------------


def _group_index(scores_B: torch.Tensor, group_sizes: Sequence[int] | torch.Tensor, least: int):
    """(sizes_G, cu_G1, seg_B) of consecutive groups; every group must hold >= `least` entries."""
    sizes = torch.as_tensor(group_sizes, dtype=torch.int64, device=scores_B.device)
    if sizes.dim() != 1 or int(sizes.sum()) != scores_B.shape[0] or bool((sizes < least).any()):
        raise ValueError(
            f"group_sizes must be >= {least} and sum to len(scores_B) ({scores_B.shape[0]}), "
            f"got {sizes.tolist()}"
        )
    cu = cu_seqlens_from_lens(sizes, device=scores_B.device)
    return sizes, cu, segment_ids(cu)


def rloo_advantages(
    scores_B: torch.Tensor, group_sizes: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each answer's score minus the mean score of the *other*
    answers to its prompt, ``r_i - (sum_j r_j - r_i) / (k - 1)``: ``adv_B``. That is
    ``k / (k - 1)`` times the group-centred score, computed so that a group of equal scores gets
    exactly 0. Every group needs k >= 2 answers."""
    sizes, _, seg = _group_index(scores_B, group_sizes, least=2)
    centered = group_normalized_advantages(scores_B, sizes, scale_by_std=False)
    k = sizes[seg].to(centered.dtype)
    return centered * k / (k - 1)


def batch_scaled_advantages(
    scores_B: torch.Tensor,
    group_sizes: Sequence[int] | torch.Tensor,
    eps: float = 1e-6,
    batch_scores_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-centred scores divided by the std of all scores of the batch (TRL's
    ``scale_rewards="batch"``): ``(r_i - mean of r_i's group) / (std over the batch + eps)``,
    std unbiased (0 for a batch of one); a group of equal scores gets exactly 0.
    `batch_scores_B`: the scores the std is taken over when `scores_B` is one part of the
    batch (a data-parallel rank's; default `scores_B`)."""
    _group_index(scores_B, group_sizes, least=1)
    centered = group_normalized_advantages(scores_B, group_sizes, scale_by_std=False)
    x = (scores_B if batch_scores_B is None else batch_scores_B).to(centered.dtype)
    std = x.std() if x.numel() > 1 else x.new_zeros(())
    return centered / (std + eps)


def groups_with_distinct_scores(
    scores_B: torch.Tensor, group_sizes: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """DAPO's dynamic-sampling criterion, ``keep_G`` (bool): True for a group whose scores are
    not all exactly equal (a group of equal scores has zero group-normalised advantage, so it
    gives no gradient)."""
    _, cu, seg = _group_index(scores_B, group_sizes, least=1)
    n_groups = cu.numel() - 1
    big = torch.finfo(torch.float64).max
    x = scores_B.to(torch.float64)
    hi = torch.full((n_groups,), -big, dtype=x.dtype, device=x.device).scatter_reduce(
        0, seg, x, reduce="amax"
    )
    lo = torch.full((n_groups,), big, dtype=x.dtype, device=x.device).scatter_reduce(
        0, seg, x, reduce="amin"
    )
    return hi > lo


# ---- reward shaping -----------------------------------------------------------------------------


def overlong_penalty(
    answer_len_B: torch.Tensor, max_answer_tokens: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), ``penalty_B`` (<= 0) to add to
    the score: 0 up to ``L_max - L_cache`` answer tokens, then falling linearly to
    ``-penalty_factor`` at ``L_max`` (``L_max = max_answer_tokens``, ``L_cache = buffer_len``);
    ``-penalty_factor`` beyond ``L_max``."""
    if not 0 < buffer_len <= max_answer_tokens:
        raise ValueError(
            f"buffer_len ({buffer_len}) must be in 1..max_answer_tokens ({max_answer_tokens})"
        )
    n = answer_len_B.to(torch.float32)
    expected = max_answer_tokens - buffer_len
    ramp = (expected - n) / buffer_len
    out = torch.where(n <= expected, torch.zeros_like(n), ramp)
    out = torch.where(n > max_answer_tokens, torch.full_like(n, -1.0), out)
    return penalty_factor * out


def sequence_kl(
    logprobs_T1: torch.Tensor,
    ref_logprobs_T1: torch.Tensor,
    loss_mask_T1: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    kind: str = "k1",
) -> torch.Tensor:
    """``kl_B``: per sequence, the sum over answer tokens of the ``kind`` estimate of
    KL(pi || ref) (see ``kl.kl_estimate``); RLOO puts ``-beta * kl_B`` into the reward."""
    check_same_shape("logprobs_T1", logprobs_T1, "loss_mask_T1", loss_mask_T1)
    kl_T1 = kl_estimate(logprobs_T1, ref_logprobs_T1, kind) * loss_mask_T1.to(logprobs_T1.dtype)
    return segment_sum(kl_T1, shifted_cu_seqlens(cu_seqlens_B1))


def discounted_returns(
    rewards_T1: torch.Tensor,
    loss_mask_T1: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Reward-to-go ``G_t = sum_{s >= t} gamma^(s-t) r_s`` over the answer tokens of each
    sequence: ``returns_T1`` (0 off the mask). Rewards off the mask are ignored."""
    check_same_shape("rewards_T1", rewards_T1, "loss_mask_T1", loss_mask_T1)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma ({gamma}) must be in [0, 1]")
    mask = loss_mask_T1.bool()
    r = torch.where(mask, rewards_T1, torch.zeros_like(rewards_T1))
    cu1 = shifted_cu_seqlens(cu_seqlens_B1).long()
    out = torch.zeros_like(r)
    if gamma == 1.0:  # a reverse cumulative sum per sequence, no Python loop over tokens
        seg = segment_ids(cu1)
        total_B = segment_sum(r, cu1)
        before = torch.cumsum(r, 0) - r  # sum of r over all earlier positions
        start_B = torch.cumsum(total_B, 0) - total_B
        out = total_B[seg] - (before - start_B[seg])
    else:
        for a, b in zip(cu1[:-1].tolist(), cu1[1:].tolist()):
            running = r.new_zeros(())
            for t in range(b - 1, a - 1, -1):
                running = r[t] + gamma * running
                out[t] = running
    return torch.where(mask, out, torch.zeros_like(out))


def reinforce_pp_advantages(
    score_B: torch.Tensor,
    logprobs_T1: torch.Tensor,
    ref_logprobs_T1: torch.Tensor,
    loss_mask_T1: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): token rewards ``r_t = -kl_coef * KL_t`` plus the sequence's score
    at its last answer token, their reward-to-go, whitened over every answer token of the batch
    (global batch normalisation). Returns ``(advantages_T1, returns_T1)``; no gradient.
    Each sequence needs at least one answer token."""
    check_same_shape("logprobs_T1", logprobs_T1, "ref_logprobs_T1", ref_logprobs_T1)
    check_same_shape("logprobs_T1", logprobs_T1, "loss_mask_T1", loss_mask_T1)
    with torch.no_grad():
        mask = loss_mask_T1.bool()
        cu1 = shifted_cu_seqlens(cu_seqlens_B1).long()
        if score_B.shape != (cu1.numel() - 1,):
            raise ValueError(
                f"score_B has shape {tuple(score_B.shape)}; cu_seqlens_B1 describes "
                f"{cu1.numel() - 1} sequences"
            )
        dtype = torch.promote_types(logprobs_T1.dtype, torch.float32)
        kl_T1 = kl_estimate(logprobs_T1.to(dtype), ref_logprobs_T1.to(dtype), kl_kind)
        rewards = -kl_coef * kl_T1 * mask
        seg = segment_ids(cu1)
        pos = torch.arange(mask.numel(), device=mask.device)
        last_B = torch.full_like(cu1[1:], -1).scatter_reduce(
            0, seg, torch.where(mask, pos, -1), reduce="amax"
        )
        if bool((last_B < 0).any()):
            raise ValueError(f"sequence {int((last_B < 0).nonzero()[0])} has no answer tokens")
        rewards[last_B] += score_B.to(dtype)
        returns = discounted_returns(rewards, mask, cu_seqlens_B1, gamma)
        return masked_whiten(returns, mask), returns
