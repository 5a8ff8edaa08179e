"""Building blocks of the packed transformer: norms, rotary embeddings, MLP, attention.

Every projection is an `nn.Linear` attribute with an HF-like name (`q_proj`, `k_proj`,
`v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`); with a `ShardSpec` of tp > 1 they
hold this rank's block (realflow.parallel.partition) and o_proj / down_proj are row-parallel.
Tensors are packed: T tokens, no batch axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from realflow.models.attention import PackedSeqs, varlen_attention
from realflow.models.config import RopeScaling, TransformerConfig
from realflow.parallel.partition import ShardSpec, kv_head_range, q_head_range, split_range
from realflow.parallel.tp import ReplicatedHeadLinear, RowParallelLinear, copy_to_tp


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as HF Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        dtype = x_TD.dtype
        x = x_TD.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm_type == "rms":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) for default, linear and llama3 rotary scaling."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
    )
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions (computed in fp32, cast to the activation dtype)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        # A plain fp32 attribute, not a buffer: model.to(bfloat16) or a meta-device build must
        # not touch it.
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, position_ids_T: torch.Tensor, dtype: torch.dtype):
        """Returns (cos_TD, sin_TD), D = head_dim."""
        if self.inv_freq.device != position_ids_T.device:
            self.inv_freq = self.inv_freq.to(position_ids_T.device)
        with torch.autocast(device_type=position_ids_T.device.type, enabled=False):
            freqs = position_ids_T.float()[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x_THD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    half = x_THD.shape[-1] // 2
    rotated = torch.cat((-x_THD[..., half:], x_THD[..., :half]), dim=-1)
    return x_THD * cos_TD[:, None, :] + rotated * sin_TD[:, None, :]


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def _tp(shard: ShardSpec | None) -> ShardSpec | None:
    """The spec when it splits tensors (tp > 1), else None: the plain single-device layers."""
    return shard if shard is not None and shard.tp_size > 1 else None


class MLP(nn.Module):
    """Gated (`down(act(gate(x)) * up(x))`, llama) or plain (`down(act(up(x)))`, gpt2) MLP.

    Under tensor parallelism gate/up are column-parallel and down row-parallel (see
    realflow.parallel.partition)."""

    def __init__(self, cfg: TransformerConfig, shard: ShardSpec | None = None):
        super().__init__()
        d, bias, tp = cfg.hidden_size, cfg.mlp_bias, _tp(shard)
        f = cfg.intermediate_size
        if tp is not None:
            a, b = split_range(f, tp.tp_size, tp.tp_rank)
            f = b - a
        self.gate_proj = nn.Linear(d, f, bias=bias) if cfg.gated_mlp else None
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = (
            nn.Linear(f, d, bias=bias) if tp is None else RowParallelLinear(f, d, bias, tp.tp_group)
        )
        self.act = _ACTIVATIONS[cfg.activation]
        self.tp_group = None if tp is None else tp.tp_group

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            x_TD = copy_to_tp(x_TD, self.tp_group)
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x_TD)) * self.up_proj(x_TD))
        return self.down_proj(self.act(self.up_proj(x_TD)))


@dataclass
class ForwardContext:
    """What every layer of one forward shares: packing, backend, rotary tables, KV cache."""

    seqs: PackedSeqs
    attn_impl: str
    cos_TD: torch.Tensor | None = None
    sin_TD: torch.Tensor | None = None
    cache: object | None = None  # realflow.models.kv_cache.KVCache while generating


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention over a packed batch.

    `layer_idx` indexes the KV cache. Under tensor parallelism each rank holds n_heads / tp
    query heads and the kv heads they read (split, or replicated when tp > n_kv_heads); o_proj
    is row-parallel."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int, shard: ShardSpec | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd, tp = cfg.hidden_size, cfg.head_dim, _tp(shard)
        self.tp_group = None if tp is None else tp.tp_group
        if tp is not None:
            q0, q1 = q_head_range(cfg.n_heads, tp.tp_size, tp.tp_rank)
            k0, k1 = kv_head_range(cfg.n_kv_heads, tp.tp_size, tp.tp_rank)
            self.n_heads, self.n_kv_heads = q1 - q0, k1 - k0
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.qkv_bias)
        if tp is None or cfg.n_kv_heads % tp.tp_size == 0:
            self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.qkv_bias)
        else:  # one kv head per rank, held by tp // n_kv_heads ranks
            rep = (hd, cfg.qkv_bias, tp.tp_group, k0, cfg.n_kv_heads)
            self.k_proj = ReplicatedHeadLinear(d, *rep)
            self.v_proj = ReplicatedHeadLinear(d, *rep)
        self.o_proj = (
            nn.Linear(self.n_heads * hd, d, bias=cfg.o_bias)
            if tp is None
            else RowParallelLinear(self.n_heads * hd, d, cfg.o_bias, tp.tp_group)
        )
        self.scale = hd**-0.5

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.tp_group is not None:
            x_TD = copy_to_tp(x_TD, self.tp_group)
        t = x_TD.shape[0]
        q = self.q_proj(x_TD).view(t, self.n_heads, self.head_dim)
        k = self.k_proj(x_TD).view(t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x_TD).view(t, self.n_kv_heads, self.head_dim)
        if ctx.cos_TD is not None:
            q = apply_rotary(q, ctx.cos_TD, ctx.sin_TD)
            k = apply_rotary(k, ctx.cos_TD, ctx.sin_TD)
        cache = ctx.cache
        if cache is not None and cache.decoding:
            out = cache.attend_decode(self.layer_idx, q, k, v, self.scale)
        else:
            if cache is not None:
                cache.store_prefill(self.layer_idx, k, v)
            out = varlen_attention(q, k, v, ctx.seqs, ctx.attn_impl, self.scale)
        return self.o_proj(out.reshape(t, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x))."""

    def __init__(self, cfg: TransformerConfig, layer_idx: int, shard: ShardSpec | None = None):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx, shard)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg, shard)

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x_TD = x_TD + self.attn(self.attn_norm(x_TD), ctx)
        return x_TD + self.mlp(self.mlp_norm(x_TD))
