"""`sft`: supervised fine-tuning: a registered per-token loss (`nll` by default) weighted by the
tokens' loss scale (1 on answer tokens and 0 on the prompt unless the data carry `loss_scale`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from realflow.algorithms import gather_packed_logprobs
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES, SFT_LOSSES
from realflow.interfaces.common import (
    evaluate_loss,
    loss_scale_T1,
    map_micro_batches,
    output_sample,
    packed,
    save_hf_dir,
    shifted_seqlens,
    split_micro_batches,
    token_logprobs,
    train_engine_of,
    vocab_shard,
)
from realflow.interfaces.losses import TokenLossInput, call_loss


def n_trained_tokens(mb: SequenceSample) -> float:
    """Predicted tokens of `mb` with a loss scale > 0 (the loss weight of a micro-batch)."""
    return float((loss_scale_T1(mb, torch.device("cpu")) > 0).sum())


@INTERFACES.register("sft")
@dataclasses.dataclass
class SFTInterface(ModelInterface):
    """train_step: one optimizer step of `sum(loss_scale * loss) / n_trained_tokens` with the
    SFT loss named `loss` (realflow.interfaces.losses); stats loss, nll, n_tokens, ppl (of the
    NLL), and the loss's own. inference: per-token `logprobs` (L-1 per sequence)."""

    loss: str = "nll"

    def __post_init__(self) -> None:
        self.loss_fn: Any = SFT_LOSSES.get(self.loss)

    def loss_of(self, module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict]:
        """The loss-scale-weighted token mean of the loss over one micro-batch."""
        device = next(module.parameters()).device
        ids_T, cu_B1 = packed(mb, device)
        logits_TV = module(ids_T, cu_B1)
        shard = vocab_shard(module)
        logp_T1 = gather_packed_logprobs(logits_TV, ids_T, cu_B1, shard=shard)
        scale_T1 = loss_scale_T1(mb, device)
        inp = TokenLossInput(logits_TV, logp_T1, scale_T1, ids_T, cu_B1, shard)
        values_T1, stats = call_loss(self.loss_fn, inp, logp_T1.shape[0], f"sft {self.loss}")
        trained_T1 = scale_T1 > 0
        n = trained_T1.sum().clamp(min=1)
        loss = torch.where(trained_T1, values_T1 * scale_T1, 0.0).sum() / n
        nll = -torch.where(trained_T1, logp_T1.detach(), 0.0).sum() / n
        return loss, {**stats, "nll": float(nll)}

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        engine = train_engine_of(model, "sft")
        mbs = split_micro_batches(data, mb_spec)
        n_tokens = sum(n_trained_tokens(mb) for mb in mbs)
        if n_tokens == 0:
            raise ValueError(f"sft batch (ids {data.ids}) has no answer tokens to train on")
        stats = engine.train_batch(mbs, self.loss_of, n_trained_tokens)
        return {**stats, "n_tokens": n_tokens, "ppl": math.exp(min(stats["nll"], 50.0))}

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        logprobs = map_micro_batches(model, data, mb_spec, token_logprobs, "sft")
        return output_sample(data, {"logprobs": logprobs}, {"logprobs": shifted_seqlens(data)})

    def evaluate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        """The loss of the batch (`loss`; the answer-token NLL by default), `nll` and the
        perplexity of the NLL."""
        stats = evaluate_loss(model, data, mb_spec, self.loss_of, n_trained_tokens, "sft")
        return {**stats, "ppl": math.exp(min(stats["nll"], 50.0))}

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)
