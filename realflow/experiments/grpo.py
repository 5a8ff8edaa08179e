"""GRPO: a group of answers per prompt, group-normalised advantages, no critic."""

from __future__ import annotations

import dataclasses

from realflow.api.config import field_
from realflow.api.dfg import MFCDef
from realflow.api.registry import EXPERIMENTS
from realflow.experiments.common import (
    ExperimentConfig,
    ModelConfig,
    ModelRole,
    interface_args,
    model_field,
)
from realflow.experiments.ppo import (
    GEN,
    ROLLOUT_KEYS,
    TRAIN,
    GenerationHyperparameters,
    RewardConfig,
    policy_eval_mfcs,
    policy_roles,
    ref_node,
    reward_node,
)


@dataclasses.dataclass
class GRPOHyperparameters:
    gen: GenerationHyperparameters = dataclasses.field(default_factory=GenerationHyperparameters)
    group_size: int = field_(4, "Answers generated per prompt (one sample holds the group).", gt=1)
    n_minibatches: int = field_(2, "Minibatches (optimizer steps) per train step.", gt=0)
    kl_beta: float = field_(0.04, "Weight of the KL-to-ref loss term (k3 estimator).", ge=0.0)
    eps_clip: float = field_(0.2, "Policy ratio clip.", gt=0.0)
    scale_by_std: bool = field_(True, "Divide group-centred scores by the group std.")
    loss_agg: str = field_("token_mean", "Loss aggregation.", choices=("token_mean", "seq_mean"))
    reward_output_scaling: float = field_(1.0, "Scale of the task score.")
    mask_no_eos_with_zero: bool = field_(False, "Score 0 for answers that did not end with EOS.")
    early_stop_imp_ratio: float = field_(
        0.0, "Skip a minibatch when the mean ratio exceeds this (0: off).", ge=0.0
    )


@EXPERIMENTS.register("grpo")
@dataclasses.dataclass
class GRPOConfig(ExperimentConfig):
    """GRPO on prompt-only data, built-in task by default."""

    actor: ModelConfig = model_field("builtin:reverse-sft", lr=1e-3)
    ref: ModelConfig = model_field("builtin:reverse-sft")
    rew: ModelConfig = model_field("builtin:tiny")
    total_steps: int = field_(600, "Iterations (steps) to run.", gt=0)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    grpo: GRPOHyperparameters = dataclasses.field(default_factory=GRPOHyperparameters)

    def validate(self) -> list[str]:
        return super().validate() + self.divides_n_seqs(
            "grpo.n_minibatches", self.grpo.n_minibatches
        )

    def optimizer_steps_per_train_call(self) -> int:
        return self.grpo.n_minibatches

    def roles(self) -> dict[str, ModelRole]:
        return policy_roles(self)

    def eval_mfcs(self) -> list[MFCDef]:
        return policy_eval_mfcs(self, "grpo_actor", interface_args(self.grpo))

    def mfcs(self) -> list[MFCDef]:
        args = interface_args(self.grpo)
        train_in = (*ROLLOUT_KEYS, "ref_logprobs", "rewards")
        return [
            self.node(
                "actor_gen", "actor", GEN, "grpo_actor", args, ("packed_prompts",), ROLLOUT_KEYS
            ),
            reward_node(self),
            ref_node(self, "grpo_actor", args),
            self.node("actor_train", "actor", TRAIN, "grpo_actor", args, train_in),
        ]
