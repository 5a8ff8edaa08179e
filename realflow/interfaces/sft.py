"""`sft`: supervised fine-tuning with a token-mean NLL over answer tokens (prompt masked)."""

from __future__ import annotations

import math

import torch

from realflow.algorithms import masked_mean
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import (
    answer_mask_T1,
    evaluate_loss,
    map_micro_batches,
    output_sample,
    save_hf_dir,
    shifted_seqlens,
    split_micro_batches,
    token_logprobs,
    train_engine_of,
)


def sft_loss(module: torch.nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean NLL of the answer tokens of a micro-batch (keys packed_input_ids, prompt_mask)."""
    device = next(module.parameters()).device
    logp_T1 = token_logprobs(module, mb, device)
    cu_B1 = mb.cu_seqlens("packed_input_ids", device=device)
    mask_T1 = answer_mask_T1(mb.data["prompt_mask"].to(device), cu_B1)
    return -masked_mean(logp_T1, mask_T1), {}


def n_answer_tokens(mb: SequenceSample) -> float:
    """Answer tokens predicted in `mb` (the loss weight of a micro-batch)."""
    mask = answer_mask_T1(mb.data["prompt_mask"], mb.cu_seqlens("packed_input_ids"))
    return float(mask.sum())


@INTERFACES.register("sft")
class SFTInterface(ModelInterface):
    """train_step: one optimizer step of answer-token NLL; stats loss, n_tokens, ppl.
    inference: per-token `logprobs` (L-1 per sequence) of packed_input_ids."""

    def train_step(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        engine = train_engine_of(model, "sft")
        mbs = split_micro_batches(data, mb_spec)
        n_tokens = sum(n_answer_tokens(mb) for mb in mbs)
        if n_tokens == 0:
            raise ValueError(f"sft batch (ids {data.ids}) has no answer tokens to train on")
        stats = engine.train_batch(mbs, sft_loss, n_answer_tokens)
        return {**stats, "n_tokens": n_tokens, "ppl": math.exp(min(stats["loss"], 50.0))}

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        logprobs = map_micro_batches(model, data, mb_spec, token_logprobs, "sft")
        return output_sample(data, {"logprobs": logprobs}, {"logprobs": shifted_seqlens(data)})

    def evaluate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        """Answer-token NLL of the batch (`loss`) and its perplexity."""
        stats = evaluate_loss(model, data, mb_spec, sft_loss, n_answer_tokens, "sft")
        return {**stats, "ppl": math.exp(min(stats["loss"], 50.0))}

    def save(self, model: Model, save_dir: str) -> None:
        save_hf_dir(model, save_dir)
