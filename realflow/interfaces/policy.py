"""What the critic-free actors (grpo_actor, rloo_actor, reinforce_pp_actor) share: a rollout of
`group_size` answers per prompt, log-probs, score shaping, and a clipped policy-gradient step.
They differ only in their advantages (`CriticFreeActor.advantages`).

One sample holds a group: `generate` writes `group_size` answers per prompt into the prompt's
sample (packed_input_ids, prompt_mask, logprobs with group_size sequences; no_eos_mask and, from
the reward MFC, rewards with one value per sequence). `generate` also stamps each sample's
metadata with `policy_version`, the parameter version (train steps taken) of the weights that
wrote it; the train step reports how far behind the weights it trains those samples were
(`staleness/mean` and `staleness/max` over its samples, 0 while generation waits for the
previous train step; `policy_lag/max` is the older name of the max). Stale samples (asynchronous
rollouts) are corrected with `correction` (see realflow.algorithms.offpolicy): "decoupled"
reads `prox_logprobs`, the rollout's log-probs under the weights before this train step.

    actor_gen   (generate)   packed_prompts -> packed_input_ids, logprobs, prompt_mask, no_eos_mask
    ref_inf     (inference)  packed_input_ids -> logprobs (remapped to ref_logprobs); only when a
                             KL term needs it
    actor_prox  (inference)  packed_input_ids -> logprobs (remapped to prox_logprobs); only with
                             correction="decoupled"
    actor_train (train_step) packed_input_ids, prompt_mask, logprobs, no_eos_mask, rewards
                             [, dense_rewards] [, ref_logprobs] [, prox_logprobs] -> stats
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from realflow.algorithms import (
    CORRECTIONS,
    overlong_penalty,
    policy_loss,
    process_scores,
    segment_sum,
    shifted_cu_seqlens,
)
from realflow.algorithms.ppo import LOSS_TYPES
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
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
    early_stop_fn,
    generation_config,
    logprob_temperature,
    n_loss_tokens,
    policy_loss_stats,
    train_sample,
)

VERSION = "policy_version"  # sample metadata: the parameter version that generated the sample


@dataclasses.dataclass
class PolicyArgs:
    """Keyword arguments every critic-free actor takes (documented on the experiments' configs,
    e.g. realflow.experiments.grpo.PolicyHyperparameters)."""

    gen: dict[str, Any] = dataclasses.field(default_factory=dict)
    group_size: int = 4
    n_minibatches: int = 2
    kl_beta: float = 0.04
    eps_clip: float = 0.2
    eps_clip_high: float = 0.0  # 0: eps_clip
    loss_type: str = "dapo"
    reward_output_scaling: float = 1.0
    mask_no_eos_with_zero: bool = False
    overlong_buffer_len: int = 0  # 0: no overlong shaping
    overlong_penalty_factor: float = 1.0
    early_stop_imp_ratio: float = 0.0
    correction: str = "none"  # for stale samples: none | decoupled | tis
    is_cap: float = 0.0  # importance-weight cap of the correction

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size ({self.group_size}) must be >= 1")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type {self.loss_type!r} unknown; known: {', '.join(LOSS_TYPES)}"
            )
        if self.eps_clip_high < 0:
            raise ValueError(f"eps_clip_high ({self.eps_clip_high}) must be >= 0 (0: eps_clip)")
        if self.correction not in CORRECTIONS:
            raise ValueError(
                f"correction {self.correction!r} unknown; known: {', '.join(CORRECTIONS)}"
            )


def n_seqs_of(mb: SequenceSample) -> float:
    """Sequences of `mb` (the weight of a dr_grpo loss: a sum over tokens / sequences)."""
    return float(len(mb.flat_seqlens(IDS)))


def n_answer_seqs(mb: SequenceSample) -> float:
    """Sequences of `mb` with at least one answer token (the weight of a grpo loss)."""
    n_B = segment_sum(mb.data["loss_mask"].float(), shifted_cu_seqlens(mb.cu_seqlens(IDS)))
    return float((n_B > 0).sum())


# How much each micro-batch weighs in its minibatch's loss: its share of the loss's normaliser.
LOSS_WEIGHTS = {"dapo": n_loss_tokens, "grpo": n_answer_seqs, "dr_grpo": n_seqs_of}


class CriticFreeActor(ModelInterface):
    """generate: `group_size` answers per prompt in one sample; inference: `logprobs`;
    train_step: the clipped policy-gradient step on `advantages(data)`, with stats loss,
    pg_loss, clip_frac, importance_ratio, reward/mean... Subclasses define `advantages`."""

    args_class: type[PolicyArgs] = PolicyArgs
    name = "critic_free_actor"
    # A kl_beta * k3 term in the loss; False: the subclass puts the KL elsewhere (ref_kl is still
    # reported when ref_logprobs come in).
    kl_in_loss = True

    def __init__(self, **kwargs: Any):
        from realflow.models.generation import GenerationConfig

        self.args = build_args(self.args_class, kwargs, self.name)
        self.gconfig = generation_config(self.args.gen, GenerationConfig)
        self.temperature = logprob_temperature(self.args.gen)
        if self.args.overlong_buffer_len > self.gconfig.max_new_tokens:
            raise ValueError(
                f"{self.name}: overlong_buffer_len ({self.args.overlong_buffer_len}) must be <= "
                f"gen.max_new_tokens ({self.gconfig.max_new_tokens})"
            )

    # ---- calls ------------------------------------------------------------------------------

    def generate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        out = rollout(model, data, mb_spec, self.gconfig, self.args.group_size, self.temperature)
        out.metadata[VERSION] = [model.version] * out.bs
        return out

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        t = self.temperature
        fn = lambda m, mb, dev: token_logprobs(m, mb, dev, t)  # noqa: E731
        logprobs = map_micro_batches(model, data, mb_spec, fn, self.name)
        return SequenceSample(
            ids=list(data.ids),
            seqlens={"logprobs": shifted_seqlens(data)},
            data={"logprobs": logprobs},
            metadata=dict(data.metadata),
        )

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        engine = train_engine_of(model, self.name)
        adv_T1, stats = self.advantages(data, getattr(engine, "dp_group", None))
        tensors = {
            "old_logprobs": data.data["logprobs"].float(),
            "advantages": adv_T1.float(),
            "loss_mask": answer_mask_T1(data.data["prompt_mask"], data.cu_seqlens(IDS)),
        }
        if "ref_logprobs" in data.data:  # for the loss term, or (kl_in_loss off) its stat only
            tensors["ref_logprobs"] = data.data["ref_logprobs"].float()
        if self.args.correction == "decoupled":
            if "prox_logprobs" not in data.data:
                raise ValueError(
                    f"{self.name}: correction 'decoupled' needs prox_logprobs (an actor_prox "
                    "inference call before actor_train); the graph gave none"
                )
            tensors["prox_logprobs"] = data.data["prox_logprobs"].float()
        a = self.args
        skip = early_stop_fn(engine, mb_spec, self.temperature, a.early_stop_imp_ratio, 0.0)
        weight = LOSS_WEIGHTS[a.loss_type]
        train_stats = train_minibatches(
            engine, train_sample(data, tensors), a.n_minibatches, mb_spec, self.loss, weight, skip
        )
        if VERSION in data.metadata:
            lag = [model.version - v for v in data.metadata[VERSION]]
            stats["staleness/mean"] = sum(lag) / len(lag)
            stats["staleness/max"] = stats["policy_lag/max"] = float(max(lag))
        return {**stats, **train_stats}

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)

    # ---- the math -----------------------------------------------------------------------------

    def advantages(
        self, data: SequenceSample, dp_group: Any = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """`advantages_T1` on answer tokens (0 elsewhere) and statistics. `dp_group`: the train
        engine's data-parallel group, over which a normalisation by the whole batch gathers
        (realflow.interfaces.dp_stats); every rank of it calls this."""
        raise NotImplementedError

    def loss(self, module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict]:
        device = next(module.parameters()).device
        logp_T1 = token_logprobs(module, mb, device, self.temperature)
        d = {k: v.to(device) for k, v in mb.data.items()}
        a = self.args
        kl_weight = a.kl_beta if self.kl_in_loss else 0.0
        loss, s = policy_loss(
            logp_T1, d["old_logprobs"], d["advantages"], d["loss_mask"],
            mb.cu_seqlens(IDS, device), a.eps_clip, a.eps_clip_high or None, a.loss_type,
            self.gconfig.max_new_tokens, d.get("ref_logprobs"), kl_weight,
            correction=a.correction, prox_logprobs_T1=d.get("prox_logprobs"), is_cap=a.is_cap,
        )  # fmt: skip
        stats = policy_loss_stats(s)
        if s.ref_kl is not None:
            stats["ref_kl"] = float(s.ref_kl)
        if s.is_weight_mean is not None and s.is_capped_frac is not None:
            stats["is_weight/mean"] = float(s.is_weight_mean)
            stats["is_capped_frac"] = float(s.is_capped_frac)
        return loss, stats

    def scores(self, data: SequenceSample) -> tuple[torch.Tensor, dict[str, float]]:
        """The shaped score of each sequence, `score_B` (rewards plus the sum of its
        dense_rewards, scaled, EOS-gated, overlong-penalised), and statistics of the raw and
        shaped scores and the answers."""
        a = self.args
        score_B = data.data["rewards"].float()
        if "dense_rewards" in data.keys:  # process rewards count toward the sequence's score
            cu1_B1 = shifted_cu_seqlens(data.cu_seqlens(IDS))
            score_B = score_B + segment_sum(data.data["dense_rewards"].float(), cu1_B1)
        no_eos_B = data.data["no_eos_mask"].bool()
        shaped_B = process_scores(
            score_B, no_eos_B, a.reward_output_scaling,
            mask_no_eos_with_zero=a.mask_no_eos_with_zero,
        )  # fmt: skip
        cu_B1 = data.cu_seqlens(IDS)
        mask_T1 = answer_mask_T1(data.data["prompt_mask"], cu_B1)
        n_answer_B = segment_sum(mask_T1.float(), shifted_cu_seqlens(cu_B1))
        stats = {
            "reward/mean": float(score_B.mean()),
            "answer_len/mean": float(n_answer_B.mean()),
            "no_eos_ratio": float(no_eos_B.float().mean()),
        }
        if a.overlong_buffer_len > 0:
            penalty_B = overlong_penalty(
                n_answer_B, self.gconfig.max_new_tokens, a.overlong_buffer_len,
                a.overlong_penalty_factor,
            )  # fmt: skip
            shaped_B = shaped_B + penalty_B
            stats["overlong_penalty/mean"] = float(penalty_B.mean())
        stats["reward/processed_mean"] = float(shaped_B.mean())
        return shaped_B, stats

    @staticmethod
    def group_sizes(data: SequenceSample) -> list[int]:
        """Answers per prompt, sample by sample."""
        return [len(lens) for lens in data.seqlens[IDS]]
