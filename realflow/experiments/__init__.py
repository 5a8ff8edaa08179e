"""Built-in experiments. Importing this package registers sft, rw, dpo, ppo, grpo, rloo,
reinforce_pp and dapo."""

from realflow.experiments import dapo, dpo, grpo, ppo, reinforce_pp, rloo, rw, sft  # noqa: F401
