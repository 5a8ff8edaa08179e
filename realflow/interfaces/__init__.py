"""Interfaces: what a model function call does with a SequenceSample.

Importing this package registers the built-in interfaces in `realflow.api.registry.INTERFACES`
(sft, paired_rw, dpo, ppo_actor, ppo_critic, grpo_actor, reward) and the built-in reward scorers
in `REWARD_SCORERS` (task, model, hf_classifier, embedding_similarity, python).
"""

from realflow.interfaces import dpo, grpo, ppo, reward, rw, scorers, sft

__all__ = ["dpo", "grpo", "ppo", "reward", "rw", "scorers", "sft"]
