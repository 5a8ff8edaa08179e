"""`paired_rw`: a reward model trained with the pairwise Bradley-Terry loss on last-token scores.

Samples hold pairs as sequences [chosen_1, rejected_1, chosen_2, rejected_2, ...] under
packed_input_ids (see realflow.data.datasets.PairedDataset).
"""

from __future__ import annotations

import torch

from realflow.algorithms import pairwise_rw_loss, split_interleaved_pairs
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import (
    evaluate_loss,
    map_micro_batches,
    one_per_seq,
    output_sample,
    packed,
    save_hf_dir,
    split_micro_batches,
    train_engine_of,
)


def sequence_scores(
    module: torch.nn.Module, mb: SequenceSample, device: torch.device
) -> torch.Tensor:
    """Reward-head score of every sequence of packed_input_ids: `scores_B` float32."""
    return module(*packed(mb, device)).float()


def pairs_per_sample(mb: SequenceSample) -> list[int]:
    """How many (chosen, rejected) pairs each sample holds; a sample needs an even count > 0."""
    out = []
    for sample_id, lens in zip(mb.ids, mb.seqlens["packed_input_ids"]):
        if not lens or len(lens) % 2:
            raise ValueError(
                f"paired sample {sample_id!r} holds {len(lens)} sequences; need chosen/rejected "
                "pairs [chosen_1, rejected_1, ...]"
            )
        out.append(len(lens) // 2)
    return out


def rw_loss(module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss of a micro-batch; each sample weighs the same."""
    device = next(module.parameters()).device
    chosen, rejected = split_interleaved_pairs(sequence_scores(module, mb, device))
    loss, stats = pairwise_rw_loss(chosen, rejected, pairs_per_sample(mb))
    return loss, {
        "acc": float(stats.accuracy),
        "pos_score": float(stats.chosen_score),
        "neg_score": float(stats.rejected_score),
        "margin": float(stats.margin),
    }


@INTERFACES.register("paired_rw")
class PairedRewardInterface(ModelInterface):
    """train_step: one optimizer step of the pairwise loss; stats loss, acc (chosen > rejected),
    pos_score, neg_score, margin. inference: `rewards`, one score per sequence."""

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        engine = train_engine_of(model, "paired_rw")
        pairs_per_sample(data)  # fail early on a malformed batch
        return engine.train_batch(split_micro_batches(data, mb_spec), rw_loss, lambda mb: mb.bs)

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        rewards = map_micro_batches(model, data, mb_spec, sequence_scores, "paired_rw")
        return output_sample(data, {"rewards": rewards}, {"rewards": one_per_seq(data)})

    def evaluate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        """The pairwise loss, accuracy (chosen scored above rejected) and margins."""
        pairs_per_sample(data)
        return evaluate_loss(model, data, mb_spec, rw_loss, lambda mb: mb.bs, "paired_rw")

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)
