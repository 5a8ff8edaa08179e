"""Built-in experiments. Importing this package registers sft, rw, dpo, ppo and grpo."""

from realflow.experiments import dpo, grpo, ppo, rw, sft  # noqa: F401
