"""GRPO: a group of answers per prompt, group-normalised advantages, no critic.

    actor_gen -> rew_inf / ref_inf -> actor_train     (ref_inf only when grpo.kl_beta > 0)

Also what the other critic-free experiments (rloo, reinforce_pp, dapo) share: the policy
hyperparameters, asynchronous rollouts (`async.*`) and the nodes of their graphs. With
`async.separate_gen=true`, actor_gen runs on role `gen`, a copy of the actor's weights on its own
worker that the master refreshes after every actor_train; with `async.max_staleness=k > 0` it
may run up to k steps ahead of training, and with `async.correction=decoupled` an actor_prox
inference call gives actor_train the proximal log-probs:

    actor_gen (gen) -> rew_inf / ref_inf / actor_prox -> actor_train
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from realflow.api.config import field_
from realflow.api.dfg import MFCDef
from realflow.api.registry import EXPERIMENTS
from realflow.experiments.common import (
    SAME_AS_ACTOR,
    ExperimentConfig,
    ModelConfig,
    ModelRole,
    interface_args,
    model_field,
)
from realflow.experiments.ppo import (
    GEN,
    IDS,
    INF,
    ROLLOUT_KEYS,
    TRAIN,
    GenerationHyperparameters,
    RewardConfig,
    policy_eval_mfcs,
    policy_roles,
    ref_node,
    reward_keys,
    reward_node,
)

LOSS_TYPE_HELP = (
    "How the per-token loss is averaged, named as TRL's GRPOConfig.loss_type: 'dapo' (every "
    "answer token of the minibatch weighs the same), 'grpo' (each answer weighs the same: the "
    "mean over answers of their token means; biased toward short right and long wrong "
    "answers), 'dr_grpo' (sum over answer tokens / (answers x gen.max_new_tokens): a constant "
    "normaliser, Dr. GRPO). TRL's 'bnpo' (a token mean per device micro-batch) is 'dapo' here: "
    "micro-batches never change the loss."
)


@dataclasses.dataclass
class PolicyHyperparameters:
    """What every critic-free experiment (grpo, rloo, reinforce_pp, dapo) sets for its actor."""

    gen: GenerationHyperparameters = dataclasses.field(default_factory=GenerationHyperparameters)
    group_size: int = field_(4, "Answers generated per prompt (one sample holds the group).", gt=1)
    n_minibatches: int = field_(2, "Minibatches (optimizer steps) per train step.", gt=0)
    kl_beta: float = field_(
        0.04, "Weight of the KL-to-ref loss term (k3 estimator); 0 drops ref_inf and ref.", ge=0.0
    )
    eps_clip: float = field_(
        0.2, "Policy ratio clip: the ratio is clipped to [1 - eps_clip, 1 + eps_clip_high].", gt=0.0
    )
    eps_clip_high: float = field_(
        0.0, "Upper ratio clip (DAPO's clip-higher, e.g. 0.28); 0: eps_clip.", ge=0.0
    )
    loss_type: str = field_("dapo", LOSS_TYPE_HELP, choices=("dapo", "grpo", "dr_grpo"))
    reward_output_scaling: float = field_(1.0, "Scale of the task score.")
    mask_no_eos_with_zero: bool = field_(False, "Score 0 for answers that did not end with EOS.")
    overlong_buffer_len: int = field_(
        0,
        "DAPO's overlong shaping: an answer longer than gen.max_new_tokens - overlong_buffer_len "
        "tokens loses score linearly, up to overlong_penalty_factor at gen.max_new_tokens; 0: off.",
        ge=0,
    )
    overlong_penalty_factor: float = field_(1.0, "Score lost by an answer of max length.", ge=0.0)
    early_stop_imp_ratio: float = field_(
        0.0, "Skip a minibatch when the mean ratio exceeds this (0: off).", ge=0.0
    )

    def validate(self) -> list[str]:
        if self.overlong_buffer_len > self.gen.max_new_tokens:
            return [
                f"overlong_buffer_len ({self.overlong_buffer_len}) must be <= "
                f"gen.max_new_tokens ({self.gen.max_new_tokens})"
            ]
        return []


@dataclasses.dataclass
class GRPOHyperparameters(PolicyHyperparameters):
    scale_rewards: str = field_(
        "group",
        "How group-centred scores are scaled, named as TRL's GRPOConfig.scale_rewards: 'group' "
        "(divided by the group's std: GRPO), 'batch' (by the batch's std), 'none' (not scaled: "
        "Dr. GRPO).",
        choices=("group", "batch", "none"),
    )


@dataclasses.dataclass
class AsyncConfig:
    """Asynchronous rollouts: generation on its own worker, up to max_staleness steps ahead."""

    max_staleness: int = field_(
        0,
        "How many train steps the weights that generate a step's samples may lag behind the "
        "weights that train on them: actor_gen of step t+k may run before actor_train of step t "
        "has finished. 0: generation of step t waits for actor_train of step t-1 (on-policy). "
        "k > 0 needs async.separate_gen=true.",
        ge=0,
    )
    separate_gen: bool = field_(
        False,
        "Generate on role 'gen', a copy of the actor's weights on its own worker (allocation.gen), "
        "refreshed after every actor_train; false: actor_gen runs on the actor's worker.",
    )
    correction: str = field_(
        "decoupled",
        "Off-policy correction of the actor loss when max_staleness > 0: 'decoupled' (AReaL: "
        "the ratio to the proximal policy, the weights before this train step, from an "
        "actor_prox inference call; the loss times exp(prox - behaviour)), 'tis' (truncated "
        "importance sampling: the ratio to the behaviour log-probs, weight min(ratio, is_cap), "
        "no clip) or 'none' (the ratio to the behaviour log-probs, clipped). With "
        "max_staleness=0 every sample is on-policy and the loss is the plain one.",
        choices=("decoupled", "tis", "none"),
    )
    is_cap: float = field_(
        5.0,
        "Importance-weight cap: decoupled drops tokens whose weight exp(prox - behaviour) exceeds "
        "it (0: no cap); tis truncates the weight at it (must be > 0).",
        ge=0.0,
    )

    def validate(self) -> list[str]:
        problems = []
        if self.max_staleness > 0 and not self.separate_gen:
            problems.append(
                f"max_staleness ({self.max_staleness}) > 0 lets generation run while the actor "
                "trains, which needs generation on its own worker: set async.separate_gen=true"
            )
        if self.max_staleness > 0 and self.correction == "tis" and self.is_cap <= 0:
            problems.append(
                f"is_cap ({self.is_cap:g}) must be > 0 with correction=tis (the truncation level)"
            )
        return problems

    def actor_args(self) -> dict[str, Any]:
        """The actor interface's correction arguments (none while every sample is on-policy)."""
        if self.max_staleness == 0 or self.correction == "none":
            return {}
        return {"correction": self.correction, "is_cap": self.is_cap}


@dataclasses.dataclass
class CriticFreeConfig(ExperimentConfig):
    """The roles of a critic-free experiment: actor, ref (only when a KL term reads it), rew."""

    actor: ModelConfig = model_field("builtin:reverse-sft", lr=1e-3)
    ref: ModelConfig = model_field(SAME_AS_ACTOR)
    rew: ModelConfig = model_field(SAME_AS_ACTOR)  # weights only for scorers that need them
    total_steps: int = field_(600, "Iterations (steps) to run.", gt=0)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    async_: AsyncConfig = field_(default_factory=AsyncConfig, key="async")

    # Class attributes, not keys: the subclass's PolicyHyperparameters field and the actor's
    # interface.
    hyperparameters_field: ClassVar[str] = ""
    actor_interface: ClassVar[str] = ""

    def hyperparameters(self) -> PolicyHyperparameters:
        return getattr(self, self.hyperparameters_field)

    def actor_args(self) -> dict[str, Any]:
        """The actor interface's keyword arguments: the hyperparameters (and the off-policy
        correction of asynchronous rollouts)."""
        return {**interface_args(self.hyperparameters()), **self.async_.actor_args()}

    def uses_ref(self) -> bool:
        """Whether a KL term reads the reference model (else ref_inf and ref are left out)."""
        return self.hyperparameters().kl_beta > 0

    def gen_role(self) -> str:
        """The role actor_gen runs on: 'gen' (the actor's generation copy) or 'actor'."""
        return "gen" if self.async_.separate_gen else "actor"

    def uses_prox(self) -> bool:
        """Whether actor_train reads proximal log-probs (the decoupled correction)."""
        return self.async_.actor_args().get("correction") == "decoupled"

    def weight_copies(self) -> dict[str, str]:
        return {"gen": "actor"} if self.async_.separate_gen else {}

    def max_staleness(self) -> int:
        return self.async_.max_staleness

    def validate(self) -> list[str]:
        key = f"{self.hyperparameters_field}.n_minibatches"
        problems = self.divides_n_seqs(key, self.hyperparameters().n_minibatches)
        gen, actor = self.allocation.get("gen"), self.allocation.get("actor")
        if self.async_.separate_gen and gen is not None and gen == actor:
            problems.append(
                f"allocation puts gen and actor on worker {gen}, but async.separate_gen=true "
                "generates on its own worker: give allocation.gen another index"
            )
        return super().validate() + problems

    def optimizer_steps_per_train_call(self) -> int:
        return self.hyperparameters().n_minibatches

    def roles(self) -> dict[str, ModelRole]:
        roles = policy_roles(self)
        if not self.uses_ref():
            del roles["ref"]
        if self.async_.separate_gen:  # the actor's config: a resumed actor resumes it too
            roles["gen"] = ModelRole(self.actor, head="lm")
        return roles

    def mfcs(self) -> list[MFCDef]:
        """The graph grpo, rloo and reinforce_pp share (their actor interfaces differ; dapo adds
        its sampling loop): actor_gen, rew_inf, ref_inf (with a KL term), actor_prox (with the
        decoupled correction), actor_train."""
        impl, args, kl = self.actor_interface, self.actor_args(), self.uses_ref()
        return [
            actor_gen_node(self, impl, args),
            reward_node(self),
            *([ref_node(self, impl, args)] if kl else []),
            *prox_nodes(self, impl, args),
            actor_train_node(self, impl, args, kl),
        ]

    def eval_mfcs(self) -> list[MFCDef]:
        return policy_eval_mfcs(self, self.actor_interface, self.actor_args())


def actor_gen_node(cfg: CriticFreeConfig, impl: str, args: dict[str, Any]) -> MFCDef:
    """actor_gen: the rollout, `group_size` answers per prompt, on the actor or its gen copy."""
    inputs = ("packed_prompts",)
    return cfg.node("actor_gen", cfg.gen_role(), GEN, impl, args, inputs, ROLLOUT_KEYS)


def prox_nodes(cfg: CriticFreeConfig, impl: str, args: dict[str, Any]) -> list[MFCDef]:
    """actor_prox (with the decoupled correction): the log-probs of the rollout under the
    actor's weights before this step's train, written as `prox_logprobs`; else nothing."""
    if not cfg.uses_prox():
        return []
    remap = {"logprobs": "prox_logprobs"}
    return [cfg.node("actor_prox", "actor", INF, impl, args, (IDS,), ("prox_logprobs",), remap)]


def actor_train_node(
    cfg: CriticFreeConfig, impl: str, args: dict[str, Any], with_ref: bool
) -> MFCDef:
    """actor_train: the policy step on the rollout, its rewards (and dense_rewards with a
    process-reward scorer), (with_ref) ref log-probs and (decoupled correction) prox log-probs."""
    inputs = (*ROLLOUT_KEYS, *reward_keys(cfg), *(("ref_logprobs",) if with_ref else ()))
    inputs += ("prox_logprobs",) if cfg.uses_prox() else ()
    return cfg.node("actor_train", "actor", TRAIN, impl, args, inputs)


@EXPERIMENTS.register("grpo")
@dataclasses.dataclass
class GRPOConfig(CriticFreeConfig):
    """GRPO on prompt-only data, built-in task by default. Dr. GRPO: grpo.scale_rewards=none
    grpo.loss_type=dr_grpo."""

    grpo: GRPOHyperparameters = dataclasses.field(default_factory=GRPOHyperparameters)
    hyperparameters_field = "grpo"
    actor_interface = "grpo_actor"
