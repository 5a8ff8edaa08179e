"""DAPO (Yu et al. 2025): GRPO's actor with clip-higher, a token-level loss, overlong shaping and
no KL, and dynamic sampling: groups whose answers all score the same are dropped and refilled
from fresh prompts until the step has n_seqs groups that differ (at most
dapo.max_rounds batches a step).

    actor_gen -> rew_inf -> dyn_filter --(fewer than n_seqs passed: next batch)--> actor_gen
                                       \\--(n_seqs passed)--> actor_train

`dyn_filter` runs the `group_filter` interface on the reward worker; the master reruns
actor_gen and rew_inf (the loop) on fresh batches (see docs/runtime.md, "Sampling loops").
"""

from __future__ import annotations

import dataclasses
from typing import Any

from realflow.api.config import field_
from realflow.api.dfg import FilterLoop, MFCDef
from realflow.api.registry import EXPERIMENTS
from realflow.experiments.common import ExperimentConfig
from realflow.experiments.grpo import (
    CriticFreeConfig,
    GRPOHyperparameters,
    actor_gen_node,
    actor_train_node,
    prox_nodes,
)
from realflow.experiments.ppo import INF, ref_node, reward_node


@dataclasses.dataclass
class DAPOHyperparameters(GRPOHyperparameters):
    kl_beta: float = field_(
        0.0,
        "Weight of a KL-to-ref loss term (k3); DAPO has none (0 drops ref_inf and ref).",
        ge=0.0,
    )
    eps_clip_high: float = field_(0.28, "Upper ratio clip (clip-higher); 0: eps_clip.", ge=0.0)
    overlong_buffer_len: int = field_(
        4,
        "Overlong shaping: an answer longer than gen.max_new_tokens - overlong_buffer_len tokens "
        "loses score linearly, up to overlong_penalty_factor at gen.max_new_tokens; 0: off.",
        ge=0,
    )
    dynamic_sampling: bool = field_(
        True, "Drop groups whose answers all score the same and refill the step (dyn_filter)."
    )
    max_rounds: int = field_(
        4,
        "Dynamic sampling: most prompt batches generated per step; a step still short after "
        "them is topped up with groups of the last batch that did not pass.",
        gt=0,
    )


def dynamic_sampling_node(cfg: ExperimentConfig, max_rounds: int) -> MFCDef:
    """dyn_filter: keeps the groups whose rewards differ; the filter of the sampling loop."""
    mfc = cfg.node("dyn_filter", "rew", INF, "group_filter", {}, ("rewards",))
    return dataclasses.replace(mfc, filter_loop=FilterLoop(max_rounds))


@EXPERIMENTS.register("dapo")
@dataclasses.dataclass
class DAPOConfig(CriticFreeConfig):
    """DAPO on prompt-only data, built-in task by default."""

    dapo: DAPOHyperparameters = dataclasses.field(default_factory=DAPOHyperparameters)
    hyperparameters_field = "dapo"
    actor_interface = "grpo_actor"

    def actor_args(self) -> dict[str, Any]:
        """grpo_actor's arguments: the hyperparameters but the sampling loop's own."""
        args = super().actor_args()
        for key in ("dynamic_sampling", "max_rounds"):
            del args[key]
        return args

    def mfcs(self) -> list[MFCDef]:
        impl, args, kl = self.actor_interface, self.actor_args(), self.uses_ref()
        loop = self.dapo.dynamic_sampling
        return [
            actor_gen_node(self, impl, args),
            reward_node(self),
            *([dynamic_sampling_node(self, self.dapo.max_rounds)] if loop else []),
            *([ref_node(self, impl, args)] if kl else []),
            *prox_nodes(self, impl, args),
            actor_train_node(self, impl, args, kl),
        ]
