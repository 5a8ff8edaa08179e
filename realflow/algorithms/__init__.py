"""Pure RL math over packed sequences: advantages, policy/critic/preference losses, KL control.

Imports only torch. Layout conventions (T1 shifted log-prob space, answer masks, critic values and
bootstrapping) are described in :mod:`realflow.algorithms.packed`.
"""

from realflow.algorithms.advantages import gae_packed, group_normalized_advantages
from realflow.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_shaped_rewards,
    process_scores,
)
from realflow.algorithms.normalize import (
    RunningMeanStd,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from realflow.algorithms.offpolicy import CORRECTIONS, decoupled_weights, tis_surrogate
from realflow.algorithms.packed import (
    broadcast_to_tokens,
    build_answer_mask,
    cu_seqlens_from_lens,
    gather_packed_logprobs,
    last_token_values,
    packed_entropy,
    segment_ids,
    segment_sum,
    seqlens_from_cu,
    sequence_logprobs,
    shifted_cu_seqlens,
    split_critic_values,
)
from realflow.algorithms.pg import (
    batch_scaled_advantages,
    discounted_returns,
    groups_with_distinct_scores,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_kl,
)
from realflow.algorithms.ppo import (
    LOSS_TYPES,
    PPOActorStats,
    PPOCriticStats,
    aggregate_loss,
    grpo_loss,
    policy_loss,
    ppo_actor_loss,
    ppo_critic_loss,
    ppo_surrogate,
    should_skip_minibatch,
)
from realflow.algorithms.preference import (
    DPOStats,
    RWStats,
    dpo_loss,
    pairwise_rw_loss,
    split_interleaved_pairs,
)

__all__ = [
    "AdaptiveKLController",
    "CORRECTIONS",
    "DPOStats",
    "FixedKLController",
    "LOSS_TYPES",
    "PPOActorStats",
    "PPOCriticStats",
    "RWStats",
    "RunningMeanStd",
    "aggregate_loss",
    "batch_scaled_advantages",
    "broadcast_to_tokens",
    "build_answer_mask",
    "cu_seqlens_from_lens",
    "decoupled_weights",
    "discounted_returns",
    "dpo_loss",
    "gae_packed",
    "gather_packed_logprobs",
    "packed_entropy",
    "group_normalized_advantages",
    "groups_with_distinct_scores",
    "grpo_loss",
    "kl_estimate",
    "kl_shaped_rewards",
    "last_token_values",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "pairwise_rw_loss",
    "policy_loss",
    "ppo_actor_loss",
    "ppo_critic_loss",
    "ppo_surrogate",
    "process_scores",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "segment_ids",
    "segment_sum",
    "seqlens_from_cu",
    "sequence_kl",
    "sequence_logprobs",
    "shifted_cu_seqlens",
    "should_skip_minibatch",
    "split_critic_values",
    "split_interleaved_pairs",
    "tis_surrogate",
]
