"""`paired_rw`: a reward model trained with the pairwise Bradley-Terry loss on last-token scores.

Samples hold pairs as sequences [chosen_1, rejected_1, chosen_2, rejected_2, ...] under
packed_input_ids (see realflow.data.datasets.PairedDataset).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from realflow.algorithms import cu_seqlens_from_lens, segment_sum, split_interleaved_pairs
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES, RW_LOSSES
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
from realflow.interfaces.losses import RWLossInput, call_loss


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


@INTERFACES.register("paired_rw")
@dataclasses.dataclass
class PairedRewardInterface(ModelInterface):
    """train_step: one optimizer step of the pairwise loss `loss` (realflow.interfaces.losses;
    Bradley-Terry by default), averaged over each sample's pairs, then over samples; stats loss,
    acc (chosen > rejected), pos_score, neg_score, margin. inference: `rewards`, one score per
    sequence."""

    loss: str = "bradley_terry"

    def __post_init__(self) -> None:
        self.loss_fn: Any = RW_LOSSES.get(self.loss)

    def loss_of(self, module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict]:
        """The pairwise loss of a micro-batch; each sample weighs the same."""
        device = next(module.parameters()).device
        chosen, rejected = split_interleaved_pairs(sequence_scores(module, mb, device))
        inp = RWLossInput(chosen, rejected)
        per_pair, stats = call_loss(self.loss_fn, inp, chosen.shape[0], f"rw {self.loss}")
        sizes = pairs_per_sample(mb)
        cu = cu_seqlens_from_lens(sizes, device=device)
        per_sample = segment_sum(per_pair, cu) / torch.tensor(sizes, device=device)
        diff = (chosen - rejected).detach()
        return per_sample.mean(), {
            **stats,
            "acc": float((diff > 0).float().mean()),
            "pos_score": float(chosen.detach().mean()),
            "neg_score": float(rejected.detach().mean()),
            "margin": float(diff.mean()),
        }

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        engine = train_engine_of(model, "paired_rw")
        pairs_per_sample(data)  # fail early on a malformed batch
        mbs = split_micro_batches(data, mb_spec)
        return engine.train_batch(mbs, self.loss_of, lambda mb: mb.bs)

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
        return evaluate_loss(model, data, mb_spec, self.loss_of, lambda mb: mb.bs, "paired_rw")

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)
