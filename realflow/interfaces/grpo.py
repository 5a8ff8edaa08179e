"""`grpo_actor`: GRPO with group-normalised advantages and a k3 KL-to-reference loss term.

One sample holds a group: `generate` writes `group_size` answers per prompt into the prompt's
sample (packed_input_ids, prompt_mask, logprobs with group_size sequences; no_eos_mask and, from
the reward MFC, rewards with one value per sequence). Advantages are normalised within a sample.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from realflow.algorithms import (
    broadcast_to_tokens,
    group_normalized_advantages,
    grpo_loss,
    process_scores,
    segment_sum,
    shifted_cu_seqlens,
)
from realflow.algorithms.ppo import LOSS_REDUCTIONS
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES
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


@dataclasses.dataclass
class GRPOArgs:
    """Keyword arguments of grpo_actor (see realflow.experiments.grpo for the docs)."""

    gen: dict[str, Any] = dataclasses.field(default_factory=dict)
    group_size: int = 4
    n_minibatches: int = 2
    kl_beta: float = 0.04
    eps_clip: float = 0.2
    scale_by_std: bool = True
    loss_agg: str = "token_mean"
    reward_output_scaling: float = 1.0
    mask_no_eos_with_zero: bool = False
    early_stop_imp_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"grpo group_size ({self.group_size}) must be >= 1")
        if self.loss_agg not in LOSS_REDUCTIONS:
            raise ValueError(
                f"grpo loss_agg {self.loss_agg!r} unknown; known: {sorted(LOSS_REDUCTIONS)}"
            )


def n_answer_seqs(mb: SequenceSample) -> float:
    """Sequences of `mb` with at least one answer token (the weight of a seq_mean loss)."""
    n_B = segment_sum(mb.data["loss_mask"].float(), shifted_cu_seqlens(mb.cu_seqlens(IDS)))
    return float((n_B > 0).sum())


@INTERFACES.register("grpo_actor")
class GRPOActorInterface(ModelInterface):
    """generate: `group_size` answers per prompt in one sample; inference: `logprobs`;
    train_step: GRPO update with stats loss, pg_loss, ref_kl, clip_frac, reward/mean..."""

    def __init__(self, **kwargs: Any):
        from realflow.models.generation import GenerationConfig

        self.args = build_args(GRPOArgs, kwargs, "grpo_actor")
        self.gconfig = generation_config(self.args.gen, GenerationConfig)
        self.temperature = logprob_temperature(self.args.gen)

    def generate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        return rollout(model, data, mb_spec, self.gconfig, self.args.group_size, self.temperature)

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        t = self.temperature
        fn = lambda m, mb, dev: token_logprobs(m, mb, dev, t)  # noqa: E731
        logprobs = map_micro_batches(model, data, mb_spec, fn, "grpo_actor")
        return SequenceSample(
            ids=list(data.ids),
            seqlens={"logprobs": shifted_seqlens(data)},
            data={"logprobs": logprobs},
            metadata=dict(data.metadata),
        )

    def advantages(self, data: SequenceSample) -> tuple[torch.Tensor, dict[str, float]]:
        """Group-normalised advantages on answer tokens ([T1]) and reward statistics."""
        a = self.args
        score_B = data.data["rewards"].float()
        if "dense_rewards" in data.keys:  # process rewards count toward the sequence's score
            cu1_B1 = shifted_cu_seqlens(data.cu_seqlens(IDS))
            score_B = score_B + segment_sum(data.data["dense_rewards"].float(), cu1_B1)
        no_eos_B = data.data["no_eos_mask"].bool()
        processed_B = process_scores(
            score_B, no_eos_B, a.reward_output_scaling,
            mask_no_eos_with_zero=a.mask_no_eos_with_zero,
        )  # fmt: skip
        group_sizes = [len(lens) for lens in data.seqlens[IDS]]
        adv_B = group_normalized_advantages(processed_B, group_sizes, a.scale_by_std)
        cu_B1 = data.cu_seqlens(IDS)
        mask_T1 = answer_mask_T1(data.data["prompt_mask"], cu_B1)
        n_answer_B = segment_sum(mask_T1.float(), shifted_cu_seqlens(cu_B1))
        stats = {
            "reward/mean": float(score_B.mean()),
            "reward/processed_mean": float(processed_B.mean()),
            "advantages/abs_mean": float(adv_B.abs().mean()),
            "answer_len/mean": float(n_answer_B.mean()),
            "no_eos_ratio": float(no_eos_B.float().mean()),
        }
        return broadcast_to_tokens(adv_B, mask_T1, cu_B1), stats

    def loss(self, module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict]:
        device = next(module.parameters()).device
        logp_T1 = token_logprobs(module, mb, device, self.temperature)
        d = {k: v.to(device) for k, v in mb.data.items()}
        loss, s = grpo_loss(
            logp_T1, d["old_logprobs"], d["ref_logprobs"], d["advantages"], d["loss_mask"],
            mb.cu_seqlens(IDS, device), self.args.eps_clip, self.args.kl_beta, self.args.loss_agg,
        )  # fmt: skip
        return loss, {**policy_loss_stats(s), "ref_kl": float(s.ref_kl)}

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        engine = train_engine_of(model, "grpo_actor")
        adv_T1, stats = self.advantages(data)
        mask_T1 = answer_mask_T1(data.data["prompt_mask"], data.cu_seqlens(IDS))
        sample = train_sample(
            data,
            {
                "old_logprobs": data.data["logprobs"].float(),
                "ref_logprobs": data.data["ref_logprobs"].float(),
                "advantages": adv_T1.float(),
                "loss_mask": mask_T1,
            },
        )
        weight = n_loss_tokens if self.args.loss_agg == "token_mean" else n_answer_seqs
        skip = early_stop_fn(engine, mb_spec, self.temperature, self.args.early_stop_imp_ratio, 0.0)
        train_stats = train_minibatches(
            engine, sample, self.args.n_minibatches, mb_spec, self.loss, weight, skip
        )
        return {**stats, **train_stats}

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)
