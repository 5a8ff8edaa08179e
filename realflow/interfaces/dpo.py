"""`dpo`: direct preference optimisation against a frozen reference policy.

The reference role runs `inference` (-> `seqlogp`, remapped to `ref_seqlogp` by the MFC); the
actor's `train_step` reads `ref_seqlogp`. Samples hold [chosen_1, rejected_1, ...] sequences. A
sequence's log-prob is the sum of `loss_scale * log p` over its tokens (the answer tokens'
log-probs unless the data carry `loss_scale`); the pair loss is the registered DPO loss `loss`
(realflow.interfaces.losses), averaged over pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from realflow.algorithms import segment_sum, shifted_cu_seqlens, split_interleaved_pairs
from realflow.algorithms.preference import dpo_stats
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import DPO_LOSSES, INTERFACES
from realflow.interfaces.common import (
    IDS,
    evaluate_loss,
    loss_scale_T1,
    map_micro_batches,
    one_per_seq,
    output_sample,
    save_hf_dir,
    split_micro_batches,
    token_logprobs,
    train_engine_of,
)
from realflow.interfaces.losses import DPOLossInput, call_loss
from realflow.interfaces.rw import pairs_per_sample


def scaled_seqlogp(
    module: torch.nn.Module, mb: SequenceSample, device: torch.device
) -> torch.Tensor:
    """Sum of `loss_scale * log p` over the tokens of every sequence: `seqlogp_B` float32."""
    logp_T1 = token_logprobs(module, mb, device)
    cu1_B1 = shifted_cu_seqlens(mb.cu_seqlens(IDS, device=device))
    return segment_sum(logp_T1 * loss_scale_T1(mb, device), cu1_B1)


def trained_tokens_per_seq(mb: SequenceSample, device: torch.device) -> torch.Tensor:
    """Tokens with a loss scale > 0 in every sequence: `n_B` float32."""
    cu1_B1 = shifted_cu_seqlens(mb.cu_seqlens(IDS, device=device))
    return segment_sum((loss_scale_T1(mb, device) > 0).float(), cu1_B1)


@INTERFACES.register("dpo")
@dataclasses.dataclass
class DPOInterface(ModelInterface):
    """inference: `seqlogp` (one value per sequence). train_step: the DPO loss `loss` on
    packed_input_ids, prompt_mask (or loss_scale) and ref_seqlogp; stats loss, reward_acc,
    margin, chosen_reward, rejected_reward, and the loss's own."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        self.loss_fn: Any = DPO_LOSSES.get(self.loss)
        if self.beta <= 0:
            raise ValueError(f"dpo beta ({self.beta}) must be > 0")

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        seqlogp = map_micro_batches(model, data, mb_spec, scaled_seqlogp, "dpo")
        return output_sample(data, {"seqlogp": seqlogp}, {"seqlogp": one_per_seq(data)})

    def loss_of(self, module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict]:
        """DPO loss of one micro-batch (a mean over its pairs)."""
        device = next(module.parameters()).device
        pi_c, pi_r = split_interleaved_pairs(scaled_seqlogp(module, mb, device))
        ref_c, ref_r = split_interleaved_pairs(mb.data["ref_seqlogp"].to(device).float())
        n_c, n_r = split_interleaved_pairs(trained_tokens_per_seq(mb, device))
        inp = DPOLossInput(
            pi_c, pi_r, ref_c.detach(), ref_r.detach(), n_c, n_r, self.beta, self.label_smoothing
        )
        per_pair, stats = call_loss(self.loss_fn, inp, pi_c.shape[0], f"dpo {self.loss}")
        loss = per_pair.mean()
        s = dpo_stats(pi_c, pi_r, ref_c, ref_r, self.beta, loss)
        return loss, {
            **stats,
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
        return engine.train_batch(split_micro_batches(data, mb_spec), self.loss_of, n_pairs)

    def evaluate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        """The DPO loss, reward accuracy and margins of the pairs under the current weights."""
        pairs_per_sample(data)
        n_pairs = lambda mb: float(sum(pairs_per_sample(mb)))  # noqa: E731
        return evaluate_loss(model, data, mb_spec, self.loss_of, n_pairs, "dpo")

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)
