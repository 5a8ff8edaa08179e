"""KL estimators, KL-coefficient controllers and KL-shaped per-token PPO rewards."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

import torch

from realflow.algorithms.packed import check_same_shape, segment_ids, shifted_cu_seqlens


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio**2


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(
    logprobs_T1: torch.Tensor, ref_logprobs_T1: torch.Tensor, kind: str = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi: ``kl_T1``.

    With ``log_ratio = logp - ref_logp`` (Schulman, "Approximating KL divergence"):
    ``k1 = log_ratio`` (unbiased, can be negative), ``k2 = log_ratio**2 / 2`` (biased, >= 0),
    ``k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1`` (unbiased, >= 0). Differentiable.
    """
    check_same_shape("logprobs_T1", logprobs_T1, "ref_logprobs_T1", ref_logprobs_T1)
    fn = KL_ESTIMATORS.get(kind)
    if fn is None:
        close = difflib.get_close_matches(kind, KL_ESTIMATORS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown KL estimator {kind!r}, known: {sorted(KL_ESTIMATORS)}{hint}")
    return fn(logprobs_T1 - ref_logprobs_T1)


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"KL coef must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept for interface parity with :class:`AdaptiveKLController`)."""

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient saved by :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), "Fine-Tuning LMs from Human Preferences".

    ``update(kl, n)``: ``err = clip(kl / target - 1, -0.2, 0.2)``;
    ``value *= 1 + err * n / horizon`` (n = number of samples/steps the KL was measured over).
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if init_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"need init_coef >= 0, target > 0, horizon > 0; got {init_coef}, {target}, {horizon}"
            )
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient towards keeping the observed KL at ``target``."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Coefficient and settings, for checkpoints (resume is exact)."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


def process_scores(
    score_B: torch.Tensor,
    no_eos_mask_B: torch.Tensor,
    reward_scale: float = 1.0,
    reward_bias: float = 0.0,
    reward_clip: float = math.inf,
    mask_no_eos_with_zero: bool = False,
    no_eos_penalty: float | None = None,
) -> torch.Tensor:
    """Scale, clip and EOS-gate task scores: ``score_B -> processed_B``.

    ``clip((score - reward_bias) * reward_scale, -reward_clip, reward_clip)``; then for truncated
    sequences (``no_eos_mask_B`` True) the score is set to 0 if ``mask_no_eos_with_zero`` and
    ``no_eos_penalty`` (if given) is subtracted. Both together give truncated sequences exactly
    ``-no_eos_penalty``.
    """
    check_same_shape("score_B", score_B, "no_eos_mask_B", no_eos_mask_B)
    if reward_clip <= 0:
        raise ValueError(f"reward_clip must be > 0, got {reward_clip}")
    s = ((score_B - reward_bias) * reward_scale).clamp(-reward_clip, reward_clip)
    no_eos = no_eos_mask_B.bool()
    if mask_no_eos_with_zero:
        s = torch.where(no_eos, torch.zeros_like(s), s)
    if no_eos_penalty is not None:
        s = s - no_eos_penalty * no_eos.to(s.dtype)
    return s


def kl_shaped_rewards(
    score_B: torch.Tensor,
    logprobs_T1: torch.Tensor,
    ref_logprobs_T1: torch.Tensor,
    loss_mask_T1: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    kl_coef: float,
    no_eos_mask_B: torch.Tensor,
    reward_scale: float = 1.0,
    reward_bias: float = 0.0,
    reward_clip: float = math.inf,
    mask_no_eos_with_zero: bool = False,
    no_eos_penalty: float | None = None,
) -> torch.Tensor:
    """Per-token PPO rewards ``rewards_T1`` (no gradient).

    ``r_t = -kl_coef * (logp_t - ref_logp_t)`` on answer positions (0 on prompt positions), plus the
    processed score (see :func:`process_scores`) at the last answer position of each sequence.
    ``cu_seqlens_B1`` describes the full sequences; each must have >= 1 answer position.
    """
    check_same_shape("logprobs_T1", logprobs_T1, "loss_mask_T1", loss_mask_T1)
    check_same_shape("logprobs_T1", logprobs_T1, "ref_logprobs_T1", ref_logprobs_T1)
    cu1 = shifted_cu_seqlens(cu_seqlens_B1)
    if int(cu1[-1]) != logprobs_T1.shape[0] or score_B.shape != (cu1.numel() - 1,):
        raise ValueError(
            f"logprobs_T1 has {logprobs_T1.shape[0]} entries and score_B shape {tuple(score_B.shape)}; "
            f"cu_seqlens_B1 describes {int(cu1[-1])} T1 positions in {cu1.numel() - 1} sequences"
        )
    with torch.no_grad():
        dtype = torch.promote_types(logprobs_T1.dtype, torch.float32)
        mask = loss_mask_T1.bool()
        rewards = -kl_coef * (logprobs_T1.to(dtype) - ref_logprobs_T1.to(dtype)) * mask
        seg = segment_ids(cu1)
        pos = torch.arange(mask.numel(), device=mask.device)
        last_B = torch.full_like(score_B, -1, dtype=torch.long)
        last_B = last_B.scatter_reduce(0, seg, torch.where(mask, pos, -1), reduce="amax")
        if bool((last_B < 0).any()):
            i = int((last_B < 0).nonzero()[0])
            raise ValueError(f"sequence {i} has no answer positions in loss_mask_T1")
        s = process_scores(
            score_B.to(dtype), no_eos_mask_B, reward_scale, reward_bias, reward_clip,
            mask_no_eos_with_zero, no_eos_penalty,
        )  # fmt: skip
        rewards[last_B] += s
    return rewards
