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
from realflow.algorithms.packed import (
    broadcast_to_tokens,
    build_answer_mask,
    cu_seqlens_from_lens,
    gather_packed_logprobs,
    last_token_values,
    segment_ids,
    segment_sum,
    seqlens_from_cu,
    sequence_logprobs,
    shifted_cu_seqlens,
    split_critic_values,
)
from realflow.algorithms.ppo import (
    PPOActorStats,
    PPOCriticStats,
    grpo_loss,
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
    "DPOStats",
    "FixedKLController",
    "PPOActorStats",
    "PPOCriticStats",
    "RWStats",
    "RunningMeanStd",
    "broadcast_to_tokens",
    "build_answer_mask",
    "cu_seqlens_from_lens",
    "dpo_loss",
    "gae_packed",
    "gather_packed_logprobs",
    "grpo_loss",
    "group_normalized_advantages",
    "kl_estimate",
    "kl_shaped_rewards",
    "last_token_values",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_rw_loss",
    "ppo_actor_loss",
    "ppo_critic_loss",
    "ppo_surrogate",
    "process_scores",
    "segment_ids",
    "segment_sum",
    "seqlens_from_cu",
    "sequence_logprobs",
    "shifted_cu_seqlens",
    "should_skip_minibatch",
    "split_critic_values",
    "split_interleaved_pairs",
]
