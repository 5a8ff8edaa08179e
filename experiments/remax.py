"""Example (b): a new dataflow, ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient
Reinforcement Learning Method for Aligning Large Language Models").

ReMax is REINFORCE with a baseline that costs one greedy answer per prompt instead of a critic:
the actor generates twice, once sampling and once greedily; both answers are scored; the sampled
answer's advantage is `r(sample) - r(greedy)`, the same for all its tokens. The actor's loss adds
a KL penalty to the reference model (k3 estimator, weight `remax.kl_beta`).

    actor_gen        (generate,  actor)  packed_prompts -> packed_input_ids, prompt_mask, no_eos_mask
    actor_greedy_gen (generate,  actor)  packed_prompts -> greedy_input_ids, greedy_prompt_mask, greedy_no_eos_mask
    rew_inf          (inference, rew)    packed_input_ids, prompt_mask -> rewards
    greedy_rew_inf   (inference, rew)    greedy_input_ids, greedy_prompt_mask -> greedy_rewards
    ref_inf          (inference, ref)    packed_input_ids -> ref_logprobs
    actor_train      (train_step, actor) ..., rewards, greedy_rewards, ref_logprobs -> stats

Keys are global, so the greedy branch renames what its interfaces read and write with
`output_key_remap` / `input_key_remap`: the generate interface and the reward interface are the
same classes the sampled branch uses.

    python -m realflow.quickstart remax plugins=[experiments/remax.py] total_steps=20
    python -m realflow.quickstart remax plugins=[experiments/remax.py] --dry-run
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from realflow.algorithms import (
    broadcast_to_tokens,
    kl_estimate,
    masked_mean,
    process_scores,
    segment_sum,
    shifted_cu_seqlens,
)
from realflow.api.config import field_
from realflow.api.data import SequenceSample
from realflow.api.dfg import MFCDef, MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import EXPERIMENTS, INTERFACES
from realflow.experiments.common import (
    ExperimentConfig,
    ModelConfig,
    ModelRole,
    interface_args,
    model_field,
)
from realflow.experiments.ppo import (
    GEN,
    TRAIN,
    GenerationHyperparameters,
    RewardConfig,
    policy_roles,
    ref_node,
    reward_node,
)
from realflow.interfaces.common import (
    IDS,
    answer_mask_T1,
    build_args,
    map_micro_batches,
    rollout,
    save_hf_dir,
    shifted_seqlens,
    token_logprobs,
    train_engine_of,
    train_minibatches,
)
from realflow.interfaces.ppo import (
    generation_config,
    logprob_temperature,
    n_loss_tokens,
    train_sample,
)

# ---- the loss -----------------------------------------------------------------------------------


def remax_loss(
    logprobs_T1: torch.Tensor,
    ref_logprobs_T1: torch.Tensor,
    advantages_T1: torch.Tensor,
    loss_mask_T1: torch.Tensor,
    kl_beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE with a KL penalty, averaged over answer tokens:
    `mean(-A_t * logp_t) + kl_beta * mean(k3(logp_t, ref_logp_t))`. All inputs `[T1]`; gradients
    flow into `logprobs_T1` only."""
    pg_loss = masked_mean(-advantages_T1.detach() * logprobs_T1, loss_mask_T1)
    ref_kl = masked_mean(kl_estimate(logprobs_T1, ref_logprobs_T1.detach(), "k3"), loss_mask_T1)
    loss = pg_loss + kl_beta * ref_kl
    return loss, {"pg_loss": float(pg_loss.detach()), "ref_kl": float(ref_kl.detach())}


# ---- the actor interface ------------------------------------------------------------------------


@dataclasses.dataclass
class ReMaxArgs:
    """Keyword arguments of remax_actor (see ReMaxHyperparameters for the docs)."""

    gen: dict[str, Any] = dataclasses.field(default_factory=dict)
    n_minibatches: int = 1
    kl_beta: float = 0.05
    reward_output_scaling: float = 1.0
    max_reward_clip: float = 5.0
    mask_no_eos_with_zero: bool = False


@INTERFACES.register("remax_actor")
class ReMaxActorInterface(ModelInterface):
    """generate: one answer per prompt (sampled, or greedy with `gen.greedy`); inference:
    `logprobs` (L-1 per sequence); train_step: the ReMax update, stats loss, pg_loss, ref_kl,
    reward/mean, reward/greedy_mean, advantages/mean..."""

    def __init__(self, **kwargs: Any):
        from realflow.models.generation import GenerationConfig

        self.args = build_args(ReMaxArgs, kwargs, "remax_actor")
        self.gconfig = generation_config(self.args.gen, GenerationConfig)
        self.temperature = logprob_temperature(self.args.gen)

    def generate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        return rollout(model, data, mb_spec, self.gconfig, 1, self.temperature)

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        fn = lambda m, mb, dev: token_logprobs(m, mb, dev, self.temperature)  # noqa: E731
        logprobs = map_micro_batches(model, data, mb_spec, fn, "remax_actor")
        return SequenceSample(
            ids=list(data.ids),
            seqlens={"logprobs": shifted_seqlens(data)},
            data={"logprobs": logprobs},
            metadata=dict(data.metadata),
        )

    def advantages(self, data: SequenceSample) -> tuple[torch.Tensor, dict[str, float]]:
        """`advantages_T1`: r(sample) - r(greedy) of each prompt on its answer tokens (0
        elsewhere), both scores scaled, clipped and EOS-gated alike; and reward statistics."""
        a, d = self.args, data.data

        def processed(score_B: torch.Tensor, no_eos_B: torch.Tensor) -> torch.Tensor:
            return process_scores(
                score_B.float(), no_eos_B.bool(), a.reward_output_scaling,
                reward_clip=a.max_reward_clip, mask_no_eos_with_zero=a.mask_no_eos_with_zero,
            )  # fmt: skip

        sample_B = processed(d["rewards"], d["no_eos_mask"])
        greedy_B = processed(d["greedy_rewards"], d["greedy_no_eos_mask"])
        adv_B = sample_B - greedy_B
        cu_B1 = data.cu_seqlens(IDS)
        mask_T1 = answer_mask_T1(d["prompt_mask"], cu_B1)
        n_answer_B = segment_sum(mask_T1.float(), shifted_cu_seqlens(cu_B1))
        stats = {
            "reward/mean": float(d["rewards"].float().mean()),
            "reward/greedy_mean": float(d["greedy_rewards"].float().mean()),
            "advantages/mean": float(adv_B.mean()),
            "advantages/abs_mean": float(adv_B.abs().mean()),
            "answer_len/mean": float(n_answer_B.mean()),
            "no_eos_ratio": float(d["no_eos_mask"].float().mean()),
        }
        return broadcast_to_tokens(adv_B, mask_T1, cu_B1), stats

    def loss(self, module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict]:
        device = next(module.parameters()).device
        logp_T1 = token_logprobs(module, mb, device, self.temperature)
        d = {k: v.to(device) for k, v in mb.data.items()}
        return remax_loss(
            logp_T1, d["ref_logprobs"], d["advantages"], d["loss_mask"], self.args.kl_beta
        )

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        engine = train_engine_of(model, "remax_actor")
        adv_T1, stats = self.advantages(data)
        sample = train_sample(
            data,
            {
                "ref_logprobs": data.data["ref_logprobs"].float(),
                "advantages": adv_T1.float(),
                "loss_mask": answer_mask_T1(data.data["prompt_mask"], data.cu_seqlens(IDS)),
            },
        )
        train_stats = train_minibatches(
            engine, sample, self.args.n_minibatches, mb_spec, self.loss, n_loss_tokens
        )
        return {**stats, **train_stats}

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)


# ---- the experiment -----------------------------------------------------------------------------


@dataclasses.dataclass
class ReMaxHyperparameters:
    gen: GenerationHyperparameters = dataclasses.field(default_factory=GenerationHyperparameters)
    n_minibatches: int = field_(
        1, "Minibatches (optimizer steps) per train step; 1 is on-policy REINFORCE.", gt=0
    )
    kl_beta: float = field_(0.05, "Weight of the KL-to-ref loss term (k3 estimator).", ge=0.0)
    reward_output_scaling: float = field_(1.0, "Scale of both scores before subtracting.")
    max_reward_clip: float = field_(5.0, "Clip the scaled scores to [-c, c].", gt=0.0)
    mask_no_eos_with_zero: bool = field_(False, "Score 0 for answers that did not end with EOS.")

    def validate(self) -> list[str]:
        if self.gen.greedy:
            return ["gen.greedy: the sampled answers must be sampled (the baseline is greedy)"]
        return []


@EXPERIMENTS.register("remax")
@dataclasses.dataclass
class ReMaxConfig(ExperimentConfig):
    """ReMax: REINFORCE whose baseline is the reward of a greedy answer; no critic."""

    actor: ModelConfig = model_field("builtin:reverse-sft", lr=5e-4)
    ref: ModelConfig = model_field("builtin:reverse-sft")
    rew: ModelConfig = model_field("builtin:tiny")
    total_steps: int = field_(200, "Iterations (steps) to run.", gt=0)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    remax: ReMaxHyperparameters = dataclasses.field(default_factory=ReMaxHyperparameters)

    def validate(self) -> list[str]:
        return super().validate() + self.divides_n_seqs(
            "remax.n_minibatches", self.remax.n_minibatches
        )

    def optimizer_steps_per_train_call(self) -> int:
        return self.remax.n_minibatches

    def roles(self) -> dict[str, ModelRole]:
        return policy_roles(self)

    def mfcs(self) -> list[MFCDef]:
        args = interface_args(self.remax)
        greedy_args = {**args, "gen": {**args["gen"], "greedy": True}}
        sampled = (IDS, "prompt_mask", "no_eos_mask")
        greedy = ("greedy_input_ids", "greedy_prompt_mask", "greedy_no_eos_mask")
        train_in = (*sampled, "rewards", "greedy_rewards", "greedy_no_eos_mask", "ref_logprobs")
        return [
            self.node("actor_gen", "actor", GEN, "remax_actor", args, ("packed_prompts",), sampled),
            # The same generate interface, greedy, its outputs renamed to keys of their own.
            self.node(
                "actor_greedy_gen", "actor", GEN, "remax_actor", greedy_args,
                ("packed_prompts",), greedy, dict(zip(sampled, greedy)),
            ),
            reward_node(self),
            # The same reward node, reading the greedy keys under the names it expects.
            dataclasses.replace(
                reward_node(self),
                name="greedy_rew_inf",
                input_keys=greedy[:2],
                input_key_remap=dict(zip(greedy[:2], sampled[:2])),
                output_keys=("greedy_rewards",),
                output_key_remap={"rewards": "greedy_rewards"},
            ),
            ref_node(self, "remax_actor", args),
            self.node("actor_train", "actor", TRAIN, "remax_actor", args, train_in),
        ]  # fmt: skip
