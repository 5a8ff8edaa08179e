"""Interfaces: what a model function call does with a SequenceSample.

Importing this package registers the built-in interfaces in `realflow.api.registry.INTERFACES`
(sft, paired_rw, dpo, ppo_actor, ppo_critic, grpo_actor, rloo_actor, reinforce_pp_actor,
group_filter, reward) and the built-in reward scorers
in `REWARD_SCORERS` (task, model, hf_classifier, embedding_similarity, python).
"""

from realflow.interfaces import (
    dpo,
    dynamic_sampling,
    grpo,
    ppo,
    reinforce_pp,
    reward,
    rloo,
    rw,
    scorers,
    sft,
)

__all__ = [
    "dpo",
    "dynamic_sampling",
    "grpo",
    "ppo",
    "reinforce_pp",
    "reward",
    "rloo",
    "rw",
    "scorers",
    "sft",
]
