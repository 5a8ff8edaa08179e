"""PPO losses, and the clipped loss of the critic-free algorithms, over packed answer tokens.

All per-token inputs are ``[T1]`` tensors in the shifted log-prob space (see ``packed``); only
positions where ``loss_mask_T1`` is set enter the losses and the statistics.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

import torch

from realflow.algorithms.kl import kl_estimate
from realflow.algorithms.normalize import masked_mean
from realflow.algorithms.offpolicy import CORRECTIONS, decoupled_weights, tis_surrogate
from realflow.algorithms.packed import check_same_shape, segment_sum, shifted_cu_seqlens


@dataclass(frozen=True)
class PPOActorStats:
    """Detached scalar statistics of a policy-loss evaluation (means are over the answer mask).

    ``approx_kl_k*`` estimate KL(old || new) from tokens sampled by the old policy with
    ``r = exp(logp - old_logp)``: k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r.
    ``ref_kl`` (GRPO only) is the mean k3 estimate of KL(pi || ref); ``entropy`` is set when given.
    With an off-policy correction (see ``offpolicy``) ``is_weight_mean`` is the mean importance
    weight of the behaviour policy and ``is_capped_frac`` the fraction of tokens it capped
    (decoupled: weight set to 0; tis: truncated at the cap).
    """

    pg_loss: torch.Tensor
    approx_kl_k1: torch.Tensor
    approx_kl_k2: torch.Tensor
    approx_kl_k3: torch.Tensor
    clip_frac: torch.Tensor
    dual_clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    n_tokens: torch.Tensor
    entropy: torch.Tensor | None = None
    ref_kl: torch.Tensor | None = None
    is_weight_mean: torch.Tensor | None = None
    is_capped_frac: torch.Tensor | None = None


@dataclass(frozen=True)
class PPOCriticStats:
    """Detached scalar statistics of the critic loss (means over the answer mask)."""

    value_loss: torch.Tensor
    clip_frac: torch.Tensor
    value_mean: torch.Tensor
    returns_mean: torch.Tensor


def ppo_surrogate(
    logprobs_T1: torch.Tensor,
    old_logprobs_T1: torch.Tensor,
    advantages_T1: torch.Tensor,
    eps_clip: float,
    dual_clip: float | None = None,
    eps_clip_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped PPO surrogate loss (to minimise).

    ``r = exp(logp - old_logp)``; ``loss = max(-A r, -A clip(r, 1 - eps_clip, 1 + eps_clip_high))``
    (``eps_clip_high`` defaults to ``eps_clip``). With ``dual_clip = c > 1`` (Ye et al. 2020) the
    loss of tokens with ``A < 0`` is further capped at ``-c A``.
    Returns ``(loss_T1, ratio_T1, clipped_T1, dual_clipped_T1)``; the last two are bool.
    """
    check_same_shape("logprobs_T1", logprobs_T1, "old_logprobs_T1", old_logprobs_T1)
    check_same_shape("logprobs_T1", logprobs_T1, "advantages_T1", advantages_T1)
    if eps_clip <= 0:
        raise ValueError(f"eps_clip must be > 0, got {eps_clip}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    high = eps_clip if eps_clip_high is None else eps_clip_high
    adv = advantages_T1.detach()
    ratio = torch.exp(logprobs_T1 - old_logprobs_T1.detach())
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - eps_clip, 1.0 + high)
    loss = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dual_clipped = torch.zeros_like(clipped)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_clipped = (adv < 0) & (pg3 < loss)
        loss = torch.where(dual_clipped, pg3, loss)
    return loss, ratio, clipped, dual_clipped


def _actor_stats(
    pg_loss: torch.Tensor,
    ratio_T1: torch.Tensor,
    clipped_T1: torch.Tensor,
    dual_T1: torch.Tensor,
    mask_T1: torch.Tensor,
    entropy_T1: torch.Tensor | None,
    ref_kl: torch.Tensor | None = None,
) -> PPOActorStats:
    with torch.no_grad():
        ratio = ratio_T1.detach()
        log_r = torch.log(ratio)
        m = mask_T1.bool()
        return PPOActorStats(
            pg_loss=pg_loss.detach(),
            approx_kl_k1=masked_mean(-log_r, m),
            approx_kl_k2=masked_mean(0.5 * log_r**2, m),
            approx_kl_k3=masked_mean(torch.expm1(log_r) - log_r, m),
            clip_frac=masked_mean(clipped_T1.to(ratio.dtype), m),
            dual_clip_frac=masked_mean(dual_T1.to(ratio.dtype), m),
            ratio_mean=masked_mean(ratio, m),
            ratio_max=torch.where(m, ratio, torch.zeros_like(ratio)).max()
            if m.numel()
            else ratio.sum(),
            n_tokens=m.sum(),
            entropy=None if entropy_T1 is None else masked_mean(entropy_T1.detach(), m),
            ref_kl=None if ref_kl is None else ref_kl.detach(),
        )


def ppo_actor_loss(
    logprobs_T1: torch.Tensor,
    old_logprobs_T1: torch.Tensor,
    advantages_T1: torch.Tensor,
    loss_mask_T1: torch.Tensor,
    eps_clip: float,
    dual_clip: float | None = None,
    entropy_T1: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    eps_clip_high: float | None = None,
) -> tuple[torch.Tensor, PPOActorStats]:
    """PPO policy loss: the clipped surrogate (:func:`ppo_surrogate`) averaged over answer tokens.

    ``loss = masked_mean(surrogate_T1) - entropy_coef * masked_mean(entropy_T1)`` (the entropy term
    only when ``entropy_T1`` is given). Gradients flow into ``logprobs_T1`` (and ``entropy_T1``);
    ``old_logprobs_T1`` and ``advantages_T1`` are treated as constants. All inputs ``[T1]``.
    """
    check_same_shape("logprobs_T1", logprobs_T1, "loss_mask_T1", loss_mask_T1)
    loss_T1, ratio, clipped, dual = ppo_surrogate(
        logprobs_T1, old_logprobs_T1, advantages_T1, eps_clip, dual_clip, eps_clip_high
    )
    pg_loss = masked_mean(loss_T1, loss_mask_T1)
    loss = pg_loss
    if entropy_T1 is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * masked_mean(entropy_T1, loss_mask_T1)
    return loss, _actor_stats(pg_loss, ratio, clipped, dual, loss_mask_T1, entropy_T1)


def should_skip_minibatch(
    stats: PPOActorStats,
    max_ratio_mean: float | None = None,
    max_approx_kl: float | None = None,
) -> bool:
    """Early stop: True when the policy moved too far from the behaviour policy on this minibatch.

    Skips when ``stats.ratio_mean > max_ratio_mean`` or ``stats.approx_kl_k3 > max_approx_kl``
    (a threshold of None is not checked). Call with the stats of a forward pass before stepping.
    """
    if max_ratio_mean is not None and float(stats.ratio_mean) > max_ratio_mean:
        return True
    return max_approx_kl is not None and float(stats.approx_kl_k3) > max_approx_kl


def ppo_critic_loss(
    values_T1: torch.Tensor,
    old_values_T1: torch.Tensor,
    returns_T1: torch.Tensor,
    loss_mask_T1: torch.Tensor,
    value_eps_clip: float | None = None,
) -> tuple[torch.Tensor, PPOCriticStats]:
    """Clipped value loss ``0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))``.

    ``v_clip = old_v + clamp(v - old_v, -value_eps_clip, value_eps_clip)``; with
    ``value_eps_clip=None`` the loss is the plain ``0.5 * masked_mean((v - R)^2)``. ``clip_frac`` is
    the fraction of answer tokens where the clipped error was the larger. All inputs ``[T1]``;
    gradients flow into ``values_T1`` only.
    """
    check_same_shape("values_T1", values_T1, "old_values_T1", old_values_T1)
    check_same_shape("values_T1", values_T1, "returns_T1", returns_T1)
    check_same_shape("values_T1", values_T1, "loss_mask_T1", loss_mask_T1)
    ret = returns_T1.detach()
    err = (values_T1 - ret) ** 2
    clipped = torch.zeros_like(err, dtype=torch.bool)
    if value_eps_clip is not None:
        if value_eps_clip <= 0:
            raise ValueError(f"value_eps_clip must be > 0, got {value_eps_clip}")
        old = old_values_T1.detach()
        v_clip = old + (values_T1 - old).clamp(-value_eps_clip, value_eps_clip)
        err_clip = (v_clip - ret) ** 2
        clipped = err_clip > err
        err = torch.maximum(err, err_clip)
    loss = 0.5 * masked_mean(err, loss_mask_T1)
    with torch.no_grad():
        stats = PPOCriticStats(
            value_loss=loss.detach(),
            clip_frac=masked_mean(clipped.to(err.dtype), loss_mask_T1),
            value_mean=masked_mean(values_T1.detach(), loss_mask_T1),
            returns_mean=masked_mean(ret, loss_mask_T1),
        )
    return loss, stats


# TRL GRPOConfig.loss_type names. TRL's "bnpo" (a token mean per device micro-batch) is not
# offered: realflow's micro-batches are a memory budget that must not change the loss; "dapo"
# is the token mean over the whole minibatch (one optimizer step), which bnpo equals when one
# micro-batch holds the minibatch.
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def aggregate_loss(
    x_T1: torch.Tensor,
    loss_mask_T1: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    loss_type: str,
    max_answer_tokens: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss over the answer tokens of a batch (differentiable):

    - ``"grpo"``: mean over sequences (those with answer tokens) of each sequence's token mean
      (DeepSeekMath);
    - ``"dapo"``: mean over all answer tokens of the batch (DAPO's token-level loss);
    - ``"dr_grpo"``: sum over all answer tokens / (number of sequences * ``max_answer_tokens``),
      a constant normaliser (Dr. GRPO, Liu et al. 2025).

    ``cu_seqlens_B1`` describes the full sequences; ``x_T1`` and the mask are ``[T1]``.
    """
    check_same_shape("x_T1", x_T1, "loss_mask_T1", loss_mask_T1)
    if loss_type not in LOSS_TYPES:
        close = difflib.get_close_matches(loss_type, LOSS_TYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss_type {loss_type!r}, known: {', '.join(LOSS_TYPES)}{hint}")
    cu1 = shifted_cu_seqlens(cu_seqlens_B1)
    if int(cu1[-1]) != x_T1.shape[0]:
        raise ValueError(
            f"x_T1 has {x_T1.shape[0]} entries, cu_seqlens_B1 describes {int(cu1[-1])}"
        )
    if loss_type == "dapo":
        return masked_mean(x_T1, loss_mask_T1)
    m = loss_mask_T1.to(x_T1.dtype)
    sum_B = segment_sum(x_T1 * m, cu1)
    if loss_type == "grpo":
        n_B = segment_sum(m, cu1)
        return (sum_B / n_B.clamp_min(1.0)).sum() / (n_B > 0).sum().clamp_min(1)
    if max_answer_tokens is None or max_answer_tokens <= 0:
        raise ValueError(
            f"loss_type 'dr_grpo' needs max_answer_tokens > 0, got {max_answer_tokens}"
        )
    return sum_B.sum() / (sum_B.numel() * max_answer_tokens)


def policy_loss(
    logprobs_T1: torch.Tensor,
    old_logprobs_T1: torch.Tensor,
    advantages_T1: torch.Tensor,
    loss_mask_T1: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    loss_type: str = "dapo",
    max_answer_tokens: int | None = None,
    ref_logprobs_T1: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    dual_clip: float | None = None,
    correction: str = "none",
    prox_logprobs_T1: torch.Tensor | None = None,
    is_cap: float = 0.0,
) -> tuple[torch.Tensor, PPOActorStats]:
    """The clipped loss of the critic-free algorithms (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++).

    Per token: the PPO surrogate with the ratio clipped to ``[1 - eps_clip, 1 + eps_clip_high]``
    (DAPO's clip-higher when ``eps_clip_high > eps_clip``; None: symmetric), plus, when
    ``ref_logprobs_T1`` is given, ``kl_beta`` times the k3 estimate of KL(pi || ref)
    (``exp(ref_logp - logp) - (ref_logp - logp) - 1``); both reduced with
    :func:`aggregate_loss`. Gradients flow into ``logprobs_T1`` only; ``ref_kl`` in the stats
    is the reduced k3 term.

    ``old_logprobs_T1`` are the behaviour log-probs (the policy that generated the tokens).
    ``correction`` (see ``offpolicy``) for stale samples: ``"none"`` (the ratio to the behaviour
    policy), ``"decoupled"`` (the ratio to ``prox_logprobs_T1``, the surrogate times
    ``exp(prox - behav)``, tokens above ``is_cap`` > 0 dropped) or ``"tis"`` (no clip: the
    truncated importance weight ``min(r, is_cap)`` to the behaviour policy).
    """
    check_same_shape("logprobs_T1", logprobs_T1, "loss_mask_T1", loss_mask_T1)
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}, known: {', '.join(CORRECTIONS)}")

    def reduce(x_T1: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(x_T1, loss_mask_T1, cu_seqlens_B1, loss_type, max_answer_tokens)

    weight = capped = None
    if correction == "tis":
        pg_T1, ratio, clipped = tis_surrogate(logprobs_T1, old_logprobs_T1, advantages_T1, is_cap)
        dual = torch.zeros_like(clipped)
        weight, capped = ratio.detach().clamp(max=is_cap), clipped
    else:
        denom_T1 = old_logprobs_T1
        if correction == "decoupled":
            if prox_logprobs_T1 is None:
                raise ValueError("correction 'decoupled' needs prox_logprobs_T1")
            denom_T1 = prox_logprobs_T1
        pg_T1, ratio, clipped, dual = ppo_surrogate(
            logprobs_T1, denom_T1, advantages_T1, eps_clip, dual_clip, eps_clip_high
        )
        if correction == "decoupled":
            weight, capped = decoupled_weights(prox_logprobs_T1, old_logprobs_T1, is_cap)
            pg_T1 = pg_T1 * weight.to(pg_T1.dtype)
    pg_loss = reduce(pg_T1)
    loss, ref_kl = pg_loss, None
    if ref_logprobs_T1 is not None:
        ref_kl = reduce(kl_estimate(logprobs_T1, ref_logprobs_T1.detach(), "k3"))
        loss = loss + kl_beta * ref_kl
    stats = _actor_stats(pg_loss, ratio, clipped, dual, loss_mask_T1, None, ref_kl)
    if weight is not None and capped is not None:
        stats = dataclasses.replace(
            stats,
            is_weight_mean=masked_mean(weight, loss_mask_T1),
            is_capped_frac=masked_mean(capped.to(weight.dtype), loss_mask_T1),
        )
    return loss, stats


# The reductions' older names, as grpo_loss takes them.
LOSS_REDUCTIONS: dict[str, str] = {"token_mean": "dapo", "seq_mean": "grpo"}


def grpo_loss(
    logprobs_T1: torch.Tensor,
    old_logprobs_T1: torch.Tensor,
    ref_logprobs_T1: torch.Tensor,
    advantages_T1: torch.Tensor,
    loss_mask_T1: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    eps_clip: float,
    beta: float,
    reduction: str = "token_mean",
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, PPOActorStats]:
    """GRPO loss: per-token clipped surrogate plus ``beta * k3`` KL to the reference policy.

    ``k3_t = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1``. ``reduction``: ``"token_mean"``
    (mean over all answer tokens of the batch) or ``"seq_mean"`` (mean over sequences with answer
    tokens of each sequence's token mean, as in DeepSeekMath): :func:`policy_loss` with
    loss_type ``"dapo"`` or ``"grpo"``. ``cu_seqlens_B1`` describes the full sequences;
    per-token inputs are ``[T1]``. Gradients flow into ``logprobs_T1`` only.
    """
    loss_type = LOSS_REDUCTIONS.get(reduction)
    if loss_type is None:
        close = difflib.get_close_matches(reduction, LOSS_REDUCTIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown loss reduction {reduction!r}, known: {sorted(LOSS_REDUCTIONS)}{hint}"
        )
    return policy_loss(
        logprobs_T1, old_logprobs_T1, advantages_T1, loss_mask_T1, cu_seqlens_B1, eps_clip,
        loss_type=loss_type, ref_logprobs_T1=ref_logprobs_T1, kl_beta=beta, dual_clip=dual_clip,
    )  # fmt: skip
