"""Preference losses: DPO / IPO for policies and Bradley-Terry for reward models."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from realflow.algorithms.packed import check_same_shape, cu_seqlens_from_lens, segment_sum


@dataclass(frozen=True)
class DPOStats:
    """Detached scalar statistics of a DPO batch.

    Implicit rewards are ``beta * (pi_logp - ref_logp)``; ``reward_accuracy`` is the fraction of
    pairs whose chosen reward is strictly larger; ``margin`` is the mean chosen - rejected reward.
    """

    loss: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    margin: torch.Tensor
    reward_accuracy: torch.Tensor


@dataclass(frozen=True)
class RWStats:
    """Detached scalar statistics of a pairwise reward-model batch (means over pairs)."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor
    chosen_score: torch.Tensor
    rejected_score: torch.Tensor


def _sigmoid_loss(logits_B: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -(1.0 - label_smoothing) * F.logsigmoid(
        beta * logits_B
    ) - label_smoothing * F.logsigmoid(-beta * logits_B)


def _ipo_loss(logits_B: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    if label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing applies to the sigmoid DPO loss only, got {label_smoothing} with ipo"
        )
    return (logits_B - 1.0 / (2.0 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid_loss,
    "ipo": _ipo_loss,
}


def dpo_loss(
    pi_chosen_logps_B: torch.Tensor,
    pi_rejected_logps_B: torch.Tensor,
    ref_chosen_logps_B: torch.Tensor,
    ref_rejected_logps_B: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, DPOStats]:
    """DPO loss over B preference pairs of summed answer log-probs (``packed.sequence_logprobs``).

    ``logits = (pi_c - pi_r) - (ref_c - ref_r)``. ``"sigmoid"`` (Rafailov et al. 2023), with
    conservative label smoothing eps (Mitchell 2023):
    ``-(1 - eps) logsigmoid(beta logits) - eps logsigmoid(-beta logits)``.
    ``"ipo"`` (Azar et al. 2023): ``(logits - 1 / (2 beta))^2``. Mean over pairs; reference
    log-probs are constants.
    """
    for name, t in (
        ("pi_rejected_logps_B", pi_rejected_logps_B),
        ("ref_chosen_logps_B", ref_chosen_logps_B),
        ("ref_rejected_logps_B", ref_rejected_logps_B),
    ):
        check_same_shape("pi_chosen_logps_B", pi_chosen_logps_B, name, t)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    fn = DPO_LOSSES.get(loss_type)
    if fn is None:
        close = difflib.get_close_matches(loss_type, DPO_LOSSES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown DPO loss_type {loss_type!r}, known: {sorted(DPO_LOSSES)}{hint}")
    chosen_logratio = pi_chosen_logps_B - ref_chosen_logps_B.detach()
    rejected_logratio = pi_rejected_logps_B - ref_rejected_logps_B.detach()
    logits = chosen_logratio - rejected_logratio
    loss = fn(logits, beta, label_smoothing).mean()
    stats = dpo_stats(
        pi_chosen_logps_B, pi_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, beta, loss
    )
    return loss, stats


def dpo_stats(
    pi_chosen_logps_B: torch.Tensor,
    pi_rejected_logps_B: torch.Tensor,
    ref_chosen_logps_B: torch.Tensor,
    ref_rejected_logps_B: torch.Tensor,
    beta: float,
    loss: torch.Tensor,
) -> DPOStats:
    """The implicit-reward statistics of B pairs (see DPOStats), whatever loss trained them."""
    with torch.no_grad():
        chosen_r = beta * (pi_chosen_logps_B - ref_chosen_logps_B).detach()
        rejected_r = beta * (pi_rejected_logps_B - ref_rejected_logps_B).detach()
        return DPOStats(
            loss=loss.detach(),
            chosen_reward=chosen_r.mean(),
            rejected_reward=rejected_r.mean(),
            margin=(chosen_r - rejected_r).mean(),
            reward_accuracy=(chosen_r > rejected_r).to(chosen_r.dtype).mean(),
        )


def pairwise_rw_loss(
    chosen_scores_P: torch.Tensor,
    rejected_scores_P: torch.Tensor,
    pairs_per_sample: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, RWStats]:
    """Bradley-Terry reward-model loss ``-logsigmoid(chosen - rejected)`` over P pairs.

    Without ``pairs_per_sample`` the loss is the mean over pairs. When a sample holds several
    pairs, ``pairs_per_sample`` gives how many consecutive pairs belong to each sample, and the
    loss is the mean over samples of each sample's mean over its pairs (every sample weighs the
    same). Statistics are always means over pairs; ``accuracy`` counts chosen > rejected.
    """
    check_same_shape("chosen_scores_P", chosen_scores_P, "rejected_scores_P", rejected_scores_P)
    diff = chosen_scores_P - rejected_scores_P
    per_pair = -F.logsigmoid(diff)
    if pairs_per_sample is None:
        loss = per_pair.mean()
    else:
        sizes = torch.as_tensor(pairs_per_sample, dtype=torch.int64, device=diff.device)
        if int(sizes.sum()) != diff.shape[0] or bool((sizes < 1).any()):
            raise ValueError(
                f"pairs_per_sample must be >= 1 and sum to the number of pairs ({diff.shape[0]}), "
                f"got {sizes.tolist()}"
            )
        per_sample = segment_sum(per_pair, cu_seqlens_from_lens(sizes, device=diff.device)) / sizes
        loss = per_sample.mean()
    with torch.no_grad():
        stats = RWStats(
            loss=loss.detach(),
            accuracy=(diff > 0).to(diff.dtype).mean(),
            margin=diff.mean(),
            chosen_score=chosen_scores_P.mean(),
            rejected_score=rejected_scores_P.mean(),
        )
    return loss, stats


def split_interleaved_pairs(scores_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split scores laid out ``[c_0, r_0, c_1, r_1, ...]`` into ``(chosen_P, rejected_P)``."""
    if scores_N.dim() != 1 or scores_N.shape[0] % 2:
        raise ValueError(f"need a 1-D tensor of even length, got shape {tuple(scores_N.shape)}")
    return scores_N[0::2], scores_N[1::2]
