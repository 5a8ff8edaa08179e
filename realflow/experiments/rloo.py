"""RLOO: k answers per prompt, each baselined by the mean score of the other k - 1.

    actor_gen -> rew_inf / ref_inf -> actor_train     (ref_inf only when rloo.kl_beta > 0)

GRPO's graph; only actor_train's interface (`rloo_actor`) changes.
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
class RLOOHyperparameters(PolicyHyperparameters):
    kl_beta: float = field_(
        0.05,
        "KL-to-ref coefficient: in the reward (kl_in_reward) or of a k3 loss term; 0 drops "
        "ref_inf and ref.",
        ge=0.0,
    )
    kl_in_reward: bool = field_(
        True,
        "Subtract kl_beta x the answer's summed KL estimate (kl_estimator) from its score "
        "before the baseline (the RLOO paper, TRL); false: a kl_beta x k3 loss term, as GRPO.",
    )
    kl_estimator: str = field_(
        "k1", "KL estimate summed into the reward (kl_in_reward).", choices=("k1", "k2", "k3")
    )


@EXPERIMENTS.register("rloo")
@dataclasses.dataclass
class RLOOConfig(CriticFreeConfig):
    """RLOO (REINFORCE leave-one-out) on prompt-only data, built-in task by default."""

    rloo: RLOOHyperparameters = dataclasses.field(default_factory=RLOOHyperparameters)
    hyperparameters_field = "rloo"
    actor_interface = "rloo_actor"
