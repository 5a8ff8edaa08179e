"""The packed decoder-only transformer with an LM, critic or reward head.

Input is a packed batch: `input_ids_T` (1-D, all sequences concatenated) and `cu_seqlens_B1`
(int32, B+1 offsets). Positions restart at 0 in every sequence and no token attends across a
sequence boundary, so nothing is ever padded.

    model = PackedTransformer(config, head="lm")
    logits_TV = model(input_ids_T, cu_seqlens_B1)      # head="lm"
    values_T = critic(input_ids_T, cu_seqlens_B1)      # head="critic": one value per token
    scores_B = reward(input_ids_T, cu_seqlens_B1)      # head="reward": read at each last token
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from realflow.models.attention import PackedSeqs, resolve_attn_impl
from realflow.models.config import HEADS, TransformerConfig
from realflow.models.layers import Block, ForwardContext, RotaryEmbedding, make_norm


class PackedTransformer(nn.Module):
    """Decoder-only transformer over packed sequences.

    Parameters are grouped for partitioning: the embedding (`embed_tokens`, `embed_positions`),
    blocks (`layers.{i}.*`) and the head (`norm`, then `lm_head` or `score`); see
    `parameter_groups`.
    """

    def __init__(self, config: TransformerConfig, head: str = "lm"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r} is unknown; choose one of {HEADS}")
        self.config = config
        self.head = head
        cfg = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = (
            nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
            if cfg.position == "learned"
            else None
        )
        self.rotary = RotaryEmbedding(cfg) if cfg.position == "rope" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head: nn.Linear | None = None
        self.score: nn.Linear | None = None
        if head == "lm":
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        else:
            bias = cfg.critic_head_bias if head == "critic" else False
            self.score = nn.Linear(cfg.hidden_size, 1, bias=bias)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Share the input embedding with the LM head when the config ties them."""
        if self.lm_head is not None and self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ----------------------------------------------------------------------------- forward

    def autocast(self) -> contextlib.AbstractContextManager:
        """torch.autocast to `config.autocast_dtype` on the model's device, or a no-op."""
        if self.config.autocast_dtype is None:
            return contextlib.nullcontext()
        dtype = getattr(torch, self.config.autocast_dtype)
        return torch.autocast(device_type=self.embed_tokens.weight.device.type, dtype=dtype)

    def hidden_states(
        self,
        input_ids_T: torch.Tensor,
        seqs: PackedSeqs,
        position_ids_T: torch.Tensor | None = None,
        cache: object | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states `h_TD`. `position_ids_T` defaults to per-sequence positions;
        `cache` (a KVCache) makes attention store keys/values (prefill) or read them (decode)."""
        if position_ids_T is None:
            position_ids_T = seqs.position_ids_T()
        h = self.embed_tokens(input_ids_T)
        if self.embed_positions is not None:
            h = h + self.embed_positions(position_ids_T)
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
        return self.norm(h)

    def forward(self, input_ids_T: torch.Tensor, cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
        """`logits_TV` (head lm), `values_T` (critic) or `scores_B` (reward)."""
        seqs = check_packed(input_ids_T, cu_seqlens_B1, self.config)
        with self.autocast():
            h_TD = self.hidden_states(input_ids_T, seqs)
            if self.head == "lm":
                return self.lm_head(h_TD)
            if self.head == "critic":
                return self.score(h_TD).squeeze(-1)
            last_B = seqs.cu_seqlens_B1[1:].long() - 1
            return self.score(h_TD[last_B]).squeeze(-1)

    # -------------------------------------------------------------------------- parameters

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names per part: "embedding", "block.{i}" for each block, "head".

        A tied LM head weight is listed both in "embedding" (as embed_tokens.weight) and in
        "head" (as lm_head.weight): it is one tensor that the first and last stage both need.
        """
        groups: dict[str, list[str]] = {"embedding": []}
        groups.update({f"block.{i}": [] for i in range(len(self.layers))})
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
