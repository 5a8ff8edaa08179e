"""Generation with a tensor- and/or pipeline-parallel model: `realflow.models.generation` with a
decode step that spans the ranks of one model replica.

    out = parallel_generate(model, groups, prompt_ids_T, prompt_cu_B1, gconfig, generator)

Every worker of the replica (its tp x pp workers) calls it with the same prompts and gets the
same `GenerationOutput`. Each step the stages run in order (hidden states sent forward), the last
stage gathers the vocab-parallel logits of the new rows, its tp rank 0 samples, and the tokens
and their log-probs (sampled and plain) are broadcast to the replica, so every rank keeps the
same active rows and KV cache. Only the sampler's `generator` is used; pass the same seed everywhere to be safe.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from realflow.models.attention import PackedSeqs
from realflow.models.generation import GenerationConfig, GenerationOutput, generate, pick_tokens
from realflow.models.kv_cache import KVCache
from realflow.models.transformer import PackedTransformer
from realflow.parallel.groups import MeshGroups
from realflow.parallel.vocab import gather_vocab


class ParallelDecodeStep:
    """A `DecodeStep` over the tp x pp workers of one replica (see the module docstring)."""

    def __init__(
        self,
        model: PackedTransformer,
        groups: MeshGroups,
        gconfig: GenerationConfig,
        generator: torch.Generator | None,
    ):
        spec = model.shard
        if spec is None or not groups.member:
            raise ValueError("ParallelDecodeStep needs a model built for a mesh (with a shard)")
        self.model, self.groups, self.gconfig, self.generator = model, groups, gconfig, generator
        self.stage, self.last = spec.pp_stage, spec.is_last_stage
        ranks = groups.pp_ranks
        self.prev = ranks[self.stage - 1] if self.stage > 0 else None
        self.next = None if self.last else ranks[self.stage + 1]
        # The sampler: tp rank 0 of the last stage of this replica.
        self.sampler = groups.mp_ranks[len(groups.mp_ranks) - spec.tp_size]
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def logits(self, ids_T, seqs: PackedSeqs, position_ids_T, cache: KVCache, rows):
        h = None
        if self.prev is not None:
            d = self.model.config.hidden_size
            h = torch.empty(ids_T.numel(), d, dtype=self.dtype, device=self.device)
            dist.recv(h, self.prev, group=self.groups.pp_group)
        h = self.model.hidden_states(ids_T, seqs, position_ids_T, cache=cache, h_TD=h)
        if not self.last:
            dist.send(h.to(self.dtype).contiguous(), self.next, group=self.groups.pp_group)
            return None
        logits = self.model.lm_logits(h if rows is None else h[rows])
        shard = self.model.vocab_shard
        return logits if shard is None else gather_vocab(logits, shard)

    def pick(self, logits_BV, step: int, stop_ids: torch.Tensor, rows_B, n_total: int):
        picked = torch.empty(3, rows_B.numel(), dtype=torch.float64, device=self.device)
        if self.groups.rank == self.sampler:
            tok_B, logp_B, plain_B = pick_tokens(
                logits_BV, step, stop_ids, self.gconfig, self.generator, rows_B, n_total
            )
            picked[0], picked[1], picked[2] = tok_B, logp_B, plain_B
        dist.broadcast(picked, self.sampler, group=self.groups.mp_group)
        return picked[0].long(), picked[1].float(), picked[2].float()


def parallel_generate(
    model: PackedTransformer,
    groups: MeshGroups,
    input_ids_T: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    gconfig: GenerationConfig,
    generator: torch.Generator | None = None,
    n_per_prompt: int = 1,
) -> GenerationOutput:
    """`realflow.models.generation.generate` for a model built with a ShardSpec (tp and/or pp);
    a model without one runs the ordinary single-device generation."""
    args = (model, input_ids_T, cu_seqlens_B1, gconfig, generator, n_per_prompt)
    if model.shard is None:
        return generate(*args)
    return generate(*args, step=ParallelDecodeStep(model, groups, gconfig, generator))
