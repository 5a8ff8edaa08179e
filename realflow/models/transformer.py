"""The packed decoder-only transformer with an LM, critic or reward head.

Input is a packed batch: `input_ids_T` (1-D, all sequences concatenated) and `cu_seqlens_B1`
(int32, B+1 offsets). Positions restart at 0 in every sequence and no token attends across a
sequence boundary, so nothing is ever padded.

    model = PackedTransformer(config, head="lm")
    logits_TV = model(input_ids_T, cu_seqlens_B1)      # head="lm"
    values_T = critic(input_ids_T, cu_seqlens_B1)      # head="critic": one value per token
    scores_B = reward(input_ids_T, cu_seqlens_B1)      # head="reward": read at each last token

With a `ShardSpec` (realflow.parallel) the model is one tensor-parallel rank and/or pipeline
stage of the whole: an LM head then returns this rank's vocab columns `logits_TVl` (see
`vocab_shard`), and a stage that is not the last returns its hidden states `h_TD`, which the
next stage takes as `forward(..., h_TD=...)`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from realflow.models.attention import PackedSeqs, resolve_attn_impl
from realflow.models.config import HEADS, TransformerConfig
from realflow.models.layers import Block, ForwardContext, RotaryEmbedding, make_norm
from realflow.parallel.layout import Layout
from realflow.parallel.partition import ShardSpec, check_layout, stage_layers, vocab_range
from realflow.parallel.tp import VocabParallelEmbedding, VocabShard, copy_to_tp


class BlockRange(nn.Module):
    """The blocks of one pipeline stage, named by their index in the whole model
    (`layers.{i}.*`), iterated in order."""

    def __init__(self, blocks: dict[int, Block]):
        super().__init__()
        for i, block in blocks.items():
            self.add_module(str(i), block)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


class PackedTransformer(nn.Module):
    """Decoder-only transformer over packed sequences.

    Parameters are grouped for partitioning: the embedding (`embed_tokens`, `embed_positions`),
    blocks (`layers.{i}.*`) and the head (`norm`, then `lm_head` or `score`); see
    `parameter_groups`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        head: str = "lm",
        shard: ShardSpec | None = None,
        init_weights: bool = True,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r} is unknown; choose one of {HEADS}")
        if shard is not None and shard.is_trivial:
            shard = None
        self.config = config
        self.head = head
        self.shard = shard
        cfg = config
        first = shard is None or shard.is_first_stage
        last = shard is None or shard.is_last_stage
        tp = shard if shard is not None and shard.tp_size > 1 else None
        if shard is not None:
            check_layout(cfg, Layout(tp=shard.tp_size, pp=shard.pp_size))
        self.embed_tokens: nn.Embedding | None = None
        self.embed_positions: nn.Embedding | None = None
        self.vocab_shard: VocabShard | None = None  # set for an LM head under tensor parallel
        if first:
            self.embed_tokens = self._vocab_embedding(tp, init_weights)
            if cfg.position == "learned":
                n_pos = cfg.max_position_embeddings
                self.embed_positions = nn.Embedding(
                    n_pos, cfg.hidden_size, _weight=_uninit(n_pos, cfg.hidden_size, init_weights)
                )
        self.rotary = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        if shard is None or shard.pp_size == 1:
            self.layers = nn.ModuleList(Block(cfg, i, shard) for i in range(cfg.n_layers))
        else:
            own = stage_layers(cfg.n_layers, shard.pp_size, shard.pp_stage)
            self.layers = BlockRange({i: Block(cfg, i - own.start, shard) for i in own})
        self.norm = make_norm(cfg) if last else None
        self.lm_head: nn.Linear | None = None
        self.score: nn.Linear | None = None
        if last and head == "lm":
            v0, v1 = (
                (0, cfg.vocab_size)
                if tp is None
                else vocab_range(cfg.vocab_size, tp.tp_size, tp.tp_rank)
            )
            self.lm_head = nn.Linear(cfg.hidden_size, v1 - v0, bias=False)
            if tp is not None:
                self.vocab_shard = VocabShard(v0, v1, cfg.vocab_size, tp.tp_group, tp.tp_size)
        elif last:
            bias = cfg.critic_head_bias if head == "critic" else False
            self.score = nn.Linear(cfg.hidden_size, 1, bias=bias)
        if init_weights:  # False: shapes only (a meta-device build, or weights loaded next)
            self.apply(self._init_weights)
        self.tie_weights()

    def _vocab_embedding(self, tp: ShardSpec | None, init: bool) -> nn.Embedding:
        cfg = self.config
        if tp is None:
            weight = _uninit(cfg.vocab_size, cfg.hidden_size, init)
            return nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        v0, v1 = vocab_range(cfg.vocab_size, tp.tp_size, tp.tp_rank)
        weight = _uninit(v1 - v0, cfg.hidden_size, init)
        return VocabParallelEmbedding(v0, v1, cfg.hidden_size, tp.tp_group, _weight=weight)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Share the input embedding with the LM head when the config ties them (a pipeline's
        last stage keeps its own copy: realflow.parallel keeps the two equal)."""
        tied = self.config.tie_word_embeddings and self.embed_tokens is not None
        if self.lm_head is not None and tied:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ----------------------------------------------------------------------------- forward

    def autocast(self, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        """torch.autocast to `config.autocast_dtype` on the model's device, or a no-op
        (`cache_enabled=False` while capturing a CUDA graph)."""
        if self.config.autocast_dtype is None:
            return contextlib.nullcontext()
        dtype = getattr(torch, self.config.autocast_dtype)
        return torch.autocast(
            device_type=self.device.type, dtype=dtype, cache_enabled=cache_enabled
        )

    def hidden_states(
        self,
        input_ids_T: torch.Tensor,
        seqs: PackedSeqs,
        position_ids_T: torch.Tensor | None = None,
        cache: object | None = None,
        h_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states `h_TD`. `position_ids_T` defaults to per-sequence positions;
        `cache` (a KVCache) makes attention store keys/values (prefill) or read them (decode).

        A pipeline stage after the first takes the previous stage's output as `h_TD`; a stage
        before the last returns its blocks' output (not normed)."""
        if position_ids_T is None:
            position_ids_T = seqs.position_ids_T()
        if self.embed_tokens is not None:
            h = self.embed_tokens(input_ids_T)
            if self.embed_positions is not None:
                h = h + self.embed_positions(position_ids_T)
        elif h_TD is None:
            raise ValueError("a pipeline stage after the first needs the previous stage's h_TD")
        else:
            h = h_TD
        dtype = (
            torch.get_autocast_dtype(h.device.type)
            if torch.is_autocast_enabled(h.device.type)
            else h.dtype
        )
        ctx = ForwardContext(
            seqs=seqs,
            attn_impl=resolve_attn_impl(self.config.attn_impl, h.device, dtype),
            cache=cache,
        )
        if self.rotary is not None:
            ctx.cos_TD, ctx.sin_TD = self.rotary(position_ids_T, dtype)
        use_ckpt = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                h = checkpoint(layer, h, ctx, use_reentrant=False)
            else:
                h = layer(h, ctx)
        return h if self.norm is None else self.norm(h)

    def forward(
        self,
        input_ids_T: torch.Tensor,
        cu_seqlens_B1: torch.Tensor,
        h_TD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`logits_TV` (head lm; `logits_TVl` under tensor parallel), `values_T` (critic) or
        `scores_B` (reward); a pipeline stage before the last returns `h_TD` for the next one,
        which passes it as `h_TD`."""
        seqs = check_packed(input_ids_T, cu_seqlens_B1, self.config)
        with self.autocast():
            h_TD = self.hidden_states(input_ids_T, seqs, h_TD=h_TD)
            if self.norm is None:
                return h_TD
            return self.head_outputs(h_TD, seqs)

    def head_outputs(self, h_TD: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        """The head applied to final hidden states (the last stage only)."""
        if self.head == "lm":
            return self.lm_logits(h_TD)
        if self.head == "critic":
            return self.score(h_TD).squeeze(-1)
        last_B = seqs.cu_seqlens_B1[1:].long() - 1
        return self.score(h_TD[last_B]).squeeze(-1)

    def lm_logits(self, h_ND: torch.Tensor) -> torch.Tensor:
        """LM head logits of some hidden rows: `logits_NV`, or this rank's `logits_NVl`."""
        if self.vocab_shard is not None:
            h_ND = copy_to_tp(h_ND, self.vocab_shard.group)
        return self.lm_head(h_ND)

    def kv_cache_dims(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) this model (rank / stage) keeps in a KV cache."""
        blocks = list(self.layers)
        n_kv = blocks[0].attn.n_kv_heads if blocks else 0
        return len(blocks), n_kv, self.config.head_dim

    # -------------------------------------------------------------------------- parameters

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names per part: "embedding", "block.{i}" for each block, "head".

        A tied LM head weight is listed both in "embedding" (as embed_tokens.weight) and in
        "head" (as lm_head.weight): it is one tensor that the first and last stage both need.
        """
        groups: dict[str, list[str]] = {"embedding": []}
        groups.update({f"block.{name}": [] for name, _ in self.layers.named_children()})
        groups["head"] = []
        for name, _ in self.named_parameters(remove_duplicate=False):
            if name.startswith("layers."):
                groups[f"block.{name.split('.')[1]}"].append(name)
            elif name.startswith(("embed_tokens.", "embed_positions.")):
                groups["embedding"].append(name)
            else:
                groups["head"].append(name)
        return groups

    def embedding_parameters(self) -> dict[str, nn.Parameter]:
        return self._params(self.parameter_groups()["embedding"])

    def block_parameters(self, i: int) -> dict[str, nn.Parameter]:
        return self._params(self.parameter_groups()[f"block.{i}"])

    def head_parameters(self) -> dict[str, nn.Parameter]:
        return self._params(self.parameter_groups()["head"])

    def _params(self, names: list[str]) -> dict[str, nn.Parameter]:
        everything = dict(self.named_parameters(remove_duplicate=False))
        return {n: everything[n] for n in names}


def _uninit(rows: int, cols: int, init: bool) -> torch.Tensor | None:
    """An uninitialised embedding weight when `init` is False (nn.Embedding then skips its own
    normal_ init, which is very slow on the meta device), else None."""
    return None if init else torch.empty(rows, cols)


def check_packed(
    input_ids_T: torch.Tensor, cu_seqlens_B1: torch.Tensor, cfg: TransformerConfig
) -> PackedSeqs:
    """Validate a packed batch and return its boundaries."""
    if input_ids_T.dim() != 1:
        raise ValueError(f"input_ids_T must be 1-D (packed), got shape {tuple(input_ids_T.shape)}")
    if cu_seqlens_B1.dim() != 1 or cu_seqlens_B1.numel() < 2:
        raise ValueError(
            f"cu_seqlens_B1 must be 1-D with B+1 >= 2 entries, got {tuple(cu_seqlens_B1.shape)}"
        )
    seqs = PackedSeqs.from_cu_seqlens(cu_seqlens_B1.to(input_ids_T.device))
    if int(cu_seqlens_B1[0]) != 0 or int(cu_seqlens_B1[-1]) != input_ids_T.numel():
        raise ValueError(
            f"cu_seqlens_B1 must start at 0 and end at len(input_ids_T) ({input_ids_T.numel()}), "
            f"got {int(cu_seqlens_B1[0])}..{int(cu_seqlens_B1[-1])}"
        )
    if min(seqs.seqlens) <= 0:
        raise ValueError(f"every sequence must have at least one token, got lengths {seqs.seqlens}")
    if cfg.position == "learned" and seqs.max_seqlen > cfg.max_position_embeddings:
        raise ValueError(
            f"a sequence of length {seqs.max_seqlen} exceeds max_position_embeddings "
            f"({cfg.max_position_embeddings}) of a model with learned positions"
        )
    return seqs
