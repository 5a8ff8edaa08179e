"""PPO: actor_gen -> rew_inf / ref_inf / critic_inf -> actor_train / critic_train."""

from __future__ import annotations

import dataclasses

from realflow.api.config import field_
from realflow.api.dfg import InterfaceType, MFCDef
from realflow.api.registry import EXPERIMENTS
from realflow.experiments.common import (
    SAME_AS_ACTOR,
    ExperimentConfig,
    ModelConfig,
    ModelRole,
    interface_args,
    model_field,
)


@dataclasses.dataclass
class GenerationHyperparameters:
    max_new_tokens: int = field_(16, "Most tokens generated per answer.", gt=0)
    min_new_tokens: int = field_(0, "Fewest tokens generated before EOS may end an answer.", ge=0)
    greedy: bool = field_(False, "Greedy decoding instead of sampling.")
    temperature: float = field_(1.0, "Sampling temperature.", gt=0.0)
    top_k: int = field_(0, "Sample among the k likeliest tokens (0: all).", ge=0)
    top_p: float = field_(1.0, "Nucleus sampling mass.", gt=0.0)

    def validate(self) -> list[str]:
        problems = []
        if self.min_new_tokens > self.max_new_tokens:
            problems.append(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        if self.top_p > 1.0:
            problems.append(f"top_p ({self.top_p}) must be <= 1")
        return problems


@dataclasses.dataclass
class RewardConfig:
    """Which scorers give the task reward, and their weights (see REWARD_SCORERS)."""

    scorers: list[str] = field_(
        ["task"],
        "Registered reward scorers: 'task' (the built-in task's verifier), 'model' (the trained "
        "reward model at rew.path), 'hf_classifier', 'embedding_similarity', or your own.",
    )
    weights: list[float] = field_([], "One weight per scorer; empty: all 1.")
    args: dict[str, str] = field_({}, "Scorer arguments, e.g. args.hf_classifier_path=/dir.")

    def validate(self) -> list[str]:
        problems = []
        if not self.scorers:
            problems.append("scorers: name at least one reward scorer")
        if self.weights and len(self.weights) != len(self.scorers):
            problems.append(
                f"weights: {len(self.weights)} weights for {len(self.scorers)} scorers {self.scorers}"
            )
        from realflow.api.registry import REWARD_SCORERS

        problems.extend(
            f"scorers: {REWARD_SCORERS.miss_message(s)}"
            for s in self.scorers
            if s not in REWARD_SCORERS
        )
        return problems

    def dense(self) -> bool:
        """Whether any scorer gives per-step (process) rewards: the reward MFC then also writes
        `dense_rewards`, which the policy's train step reads."""
        from realflow.api.registry import REWARD_SCORERS

        return any(
            getattr(REWARD_SCORERS.get(s), "dense", False)
            for s in self.scorers
            if s in REWARD_SCORERS
        )

    def needs_model(self) -> bool:
        """Whether any scorer reads the reward role's weights."""
        from realflow.api.registry import REWARD_SCORERS

        # An unknown name is validate()'s to report (with the others), not a crash here.
        return any(
            getattr(REWARD_SCORERS.get(s), "needs_model", False)
            for s in self.scorers
            if s in REWARD_SCORERS
        )


@dataclasses.dataclass
class PPOHyperparameters:
    gen: GenerationHyperparameters = dataclasses.field(default_factory=GenerationHyperparameters)
    ppo_n_minibatches: int = field_(2, "Minibatches (optimizer steps) per train step.", gt=0)
    kl_ctl: float = field_(0.05, "KL penalty coefficient in the reward.", ge=0.0)
    adaptive_kl_ctl: bool = field_(False, "Adapt kl_ctl toward adaptive_kl_target.")
    adaptive_kl_target: float = field_(6.0, "Target KL of the adaptive controller.", gt=0.0)
    adaptive_kl_horizon: float = field_(10000.0, "Horizon of the adaptive controller.", gt=0.0)
    discount: float = field_(1.0, "GAE gamma.", ge=0.0)
    gae_lambda: float = field_(1.0, "GAE lambda.", ge=0.0)
    eps_clip: float = field_(0.2, "Policy ratio clip.", gt=0.0)
    value_eps_clip: float = field_(0.2, "Value clip around the old values.", gt=0.0)
    max_reward_clip: float = field_(5.0, "Clip the scaled score to [-c, c].", gt=0.0)
    reward_output_scaling: float = field_(1.0, "Scale of the task score.")
    reward_output_bias: float = field_(0.0, "Subtracted from the task score before scaling.")
    mask_no_eos_with_zero: bool = field_(False, "Score 0 for answers that did not end with EOS.")
    no_eos_penalty: float = field_(0.0, "Added to the score of answers without EOS (e.g. -1).")
    early_stop_imp_ratio: float = field_(
        0.0, "Skip a minibatch when the mean ratio exceeds this (0: off).", ge=0.0
    )
    early_stop_kl: float = field_(
        0.0, "Skip a minibatch when the approx KL exceeds this (0: off).", ge=0.0
    )
    use_adv_norm: bool = field_(True, "Whiten advantages over the batch.")
    value_norm: bool = field_(False, "Normalise value targets with running statistics.")

    def validate(self) -> list[str]:
        if self.discount > 1.0 or self.gae_lambda > 1.0:
            return [f"discount ({self.discount}) and gae_lambda ({self.gae_lambda}) must be <= 1"]
        return []


@EXPERIMENTS.register("ppo")
@dataclasses.dataclass
class PPOConfig(ExperimentConfig):
    """PPO on prompt-only data (JSONL rows {"prompt", ...}), built-in task by default."""

    actor: ModelConfig = model_field("builtin:reverse-sft", lr=5e-4)
    critic: ModelConfig = model_field(SAME_AS_ACTOR, lr=3e-3, init_from_actor=True)
    ref: ModelConfig = model_field(SAME_AS_ACTOR)
    rew: ModelConfig = model_field(SAME_AS_ACTOR)  # weights only for scorers that need them
    total_steps: int = field_(600, "Iterations (steps) to run.", gt=0)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    ppo: PPOHyperparameters = dataclasses.field(default_factory=PPOHyperparameters)

    def validate(self) -> list[str]:
        return super().validate() + self.divides_n_seqs(
            "ppo.ppo_n_minibatches", self.ppo.ppo_n_minibatches
        )

    def optimizer_steps_per_train_call(self) -> int:
        return self.ppo.ppo_n_minibatches

    def roles(self) -> dict[str, ModelRole]:
        return {**policy_roles(self), "critic": ModelRole(self.critic, head="critic")}

    def reward_mfc(self) -> MFCDef:
        """The reward MFC; subclasses swap its interface to change how answers are scored."""
        return reward_node(self)

    def eval_mfcs(self) -> list[MFCDef]:
        return policy_eval_mfcs(self, "ppo_actor", interface_args(self.ppo))

    def mfcs(self) -> list[MFCDef]:
        args = interface_args(self.ppo)
        train_in = (*ROLLOUT_KEYS, "ref_logprobs", *reward_keys(self), "values")
        return [
            self.node(
                "actor_gen", "actor", GEN, "ppo_actor", args, ("packed_prompts",), ROLLOUT_KEYS
            ),
            self.reward_mfc(),
            ref_node(self, "ppo_actor", args),
            self.node("critic_inf", "critic", INF, "ppo_critic", args, (IDS,), ("values",)),
            self.node("actor_train", "actor", TRAIN, "ppo_actor", args, train_in),
            self.node("critic_train", "critic", TRAIN, "ppo_critic", args, train_in),
        ]


GEN, INF, TRAIN = InterfaceType.GENERATE, InterfaceType.INFERENCE, InterfaceType.TRAIN_STEP
EVAL = InterfaceType.EVALUATE
IDS = "packed_input_ids"
# What a rollout (actor_gen) writes; see realflow/api/data.py for the layout of each key.
ROLLOUT_KEYS = (IDS, "logprobs", "prompt_mask", "no_eos_mask")


def policy_roles(cfg: ExperimentConfig) -> dict[str, ModelRole]:
    """actor, ref and rew of an RL experiment; rew carries weights only when a scorer reads them."""
    reward: RewardConfig = cfg.reward  # type: ignore[attr-defined]
    return {
        "actor": ModelRole(cfg.actor, head="lm"),  # type: ignore[attr-defined]
        "ref": ModelRole(cfg.ref, head="lm"),  # type: ignore[attr-defined]
        "rew": ModelRole(cfg.rew, head="reward" if reward.needs_model() else "none"),  # type: ignore[attr-defined]
    }


def reward_keys(cfg: ExperimentConfig) -> tuple[str, ...]:
    """What rew_inf writes: `rewards`, and `dense_rewards` with a process-reward scorer."""
    reward: RewardConfig = cfg.reward  # type: ignore[attr-defined]
    return ("rewards", "dense_rewards") if reward.dense() else ("rewards",)


def reward_node(cfg: ExperimentConfig) -> MFCDef:
    """rew_inf: the `reward` interface scores each answer with the configured scorers."""
    reward: RewardConfig = cfg.reward  # type: ignore[attr-defined]
    return cfg.node(
        "rew_inf", "rew", INF, "reward", interface_args(reward), (IDS, "prompt_mask"),
        reward_keys(cfg),
    )  # fmt: skip


def policy_eval_mfcs(cfg: ExperimentConfig, impl: str, args: dict) -> list[MFCDef]:
    """eval_gen -> eval_rew: one greedy answer per eval prompt, scored by the run's reward
    scorers (eval/reward/mean)."""
    reward: RewardConfig = cfg.reward  # type: ignore[attr-defined]
    greedy = {**args, "gen": {**args["gen"], "greedy": True}}
    if "group_size" in greedy:
        greedy["group_size"] = 1
    return [
        cfg.node("eval_gen", "actor", GEN, impl, greedy, ("packed_prompts",), ROLLOUT_KEYS),
        cfg.node("eval_rew", "rew", EVAL, "reward", interface_args(reward), (IDS, "prompt_mask")),
    ]


def ref_node(cfg: ExperimentConfig, impl: str, args: dict) -> MFCDef:
    """ref_inf: the reference model's log-probs of the rollout, written as `ref_logprobs`."""
    return cfg.node(
        "ref_inf", "ref", INF, impl, args, (IDS,), ("ref_logprobs",), {"logprobs": "ref_logprobs"}
    )
