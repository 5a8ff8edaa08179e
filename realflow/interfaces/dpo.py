"""`dpo`: direct preference optimisation against a frozen reference policy.

The reference role runs `inference` (-> `seqlogp`, remapped to `ref_seqlogp` by the MFC); the
actor's `train_step` reads `ref_seqlogp`. Samples hold [chosen_1, rejected_1, ...] sequences.
"""

from __future__ import annotations

import dataclasses

import torch

from realflow.algorithms import dpo_loss, sequence_logprobs, split_interleaved_pairs
from realflow.algorithms.preference import DPO_LOSSES
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import (
    IDS,
    answer_mask_T1,
    evaluate_loss,
    map_micro_batches,
    one_per_seq,
    output_sample,
    save_hf_dir,
    split_micro_batches,
    token_logprobs,
    train_engine_of,
)
from realflow.interfaces.rw import pairs_per_sample


def answer_seqlogp(
    module: torch.nn.Module, mb: SequenceSample, device: torch.device
) -> torch.Tensor:
    """Sum of the answer-token log-probs of every sequence: `seqlogp_B` float32."""
    logp_T1 = token_logprobs(module, mb, device)
    cu_B1 = mb.cu_seqlens(IDS, device=device)
    mask_T1 = answer_mask_T1(mb.data["prompt_mask"].to(device), cu_B1)
    return sequence_logprobs(logp_T1, mask_T1, cu_B1)


@INTERFACES.register("dpo")
@dataclasses.dataclass
class DPOInterface(ModelInterface):
    """inference: `seqlogp` (one value per sequence). train_step: DPO / IPO loss on
    packed_input_ids, prompt_mask and ref_seqlogp; stats loss, reward_acc, margin,
    chosen_reward, rejected_reward."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(
                f"dpo loss_type {self.loss_type!r} unknown; known: {sorted(DPO_LOSSES)}"
            )
        if self.beta <= 0:
            raise ValueError(f"dpo beta ({self.beta}) must be > 0")

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        seqlogp = map_micro_batches(model, data, mb_spec, answer_seqlogp, "dpo")
        return output_sample(data, {"seqlogp": seqlogp}, {"seqlogp": one_per_seq(data)})

    def loss(self, module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict]:
        """DPO loss of one micro-batch (a mean over its pairs)."""
        device = next(module.parameters()).device
        pi_c, pi_r = split_interleaved_pairs(answer_seqlogp(module, mb, device))
        ref_c, ref_r = split_interleaved_pairs(mb.data["ref_seqlogp"].to(device).float())
        loss, s = dpo_loss(
            pi_c, pi_r, ref_c, ref_r, self.beta, self.loss_type, self.label_smoothing
        )
        return loss, {
            "reward_acc": float(s.reward_accuracy),
            "margin": float(s.margin),
            "chosen_reward": float(s.chosen_reward),
            "rejected_reward": float(s.rejected_reward),
        }

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        engine = train_engine_of(model, "dpo")
        pairs_per_sample(data)
        n_pairs = lambda mb: float(sum(pairs_per_sample(mb)))  # noqa: E731
        return engine.train_batch(split_micro_batches(data, mb_spec), self.loss, n_pairs)

    def evaluate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        """The DPO loss, reward accuracy and margins of the pairs under the current weights."""
        pairs_per_sample(data)
        n_pairs = lambda mb: float(sum(pairs_per_sample(mb)))  # noqa: E731
        return evaluate_loss(model, data, mb_spec, self.loss, n_pairs, "dpo")

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)
