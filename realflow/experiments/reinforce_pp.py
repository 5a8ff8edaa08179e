"""REINFORCE++: one answer per prompt, token-level KL penalty in the reward, reward-to-go
advantages normalised over the whole batch; no critic and no group.

    actor_gen -> rew_inf / ref_inf -> actor_train     (ref_inf only when reinforce_pp.kl_beta > 0)

GRPO's graph with groups of one and the `reinforce_pp_actor` interface; PPO's graph without
critic_inf and critic_train.
"""

from __future__ import annotations

import dataclasses

from realflow.api.config import field_
from realflow.api.registry import EXPERIMENTS
from realflow.experiments.grpo import (
    CriticFreeConfig,
    PolicyHyperparameters,
)


@dataclasses.dataclass
class ReinforcePPHyperparameters(PolicyHyperparameters):
    group_size: int = field_(
        1, "Answers per prompt, each scored on its own (no group baseline).", gt=0
    )
    kl_beta: float = field_(
        0.01,
        "Per-token KL penalty in the reward: r_t = -kl_beta x KL_t (kl_estimator); 0 drops "
        "ref_inf and ref.",
        ge=0.0,
    )
    kl_estimator: str = field_(
        "k1", "Per-token estimate of KL(pi || ref) in the reward.", choices=("k1", "k2", "k3")
    )
    gamma: float = field_(1.0, "Discount of the reward-to-go.", ge=0.0)

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.gamma > 1.0:
            problems.append(f"gamma ({self.gamma}) must be <= 1")
        return problems


@EXPERIMENTS.register("reinforce_pp")
@dataclasses.dataclass
class ReinforcePPConfig(CriticFreeConfig):
    """REINFORCE++ on prompt-only data, built-in task by default. n_seqs prompts of one answer
    each: the default 64 gives a step as many answers as grpo's 16 prompts x 4."""

    n_seqs: int = field_(64, "Samples (prompts, one answer each) per step.", gt=0)
    reinforce_pp: ReinforcePPHyperparameters = dataclasses.field(
        default_factory=ReinforcePPHyperparameters
    )
    hyperparameters_field = "reinforce_pp"
    actor_interface = "reinforce_pp_actor"
