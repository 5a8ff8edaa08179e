"""Tiny built-in model configs by name, so other layers can build a random-init model without files.

cfg = builtin_config("tiny-llama", vocab_size=len(tokenizer))
model = PackedTransformer(cfg, head="lm")
"""

from __future__ import annotations

from realflow.api.registry import closest
from realflow.models.config import TransformerConfig

_LLAMA = dict(family="llama", norm_type="rms", activation="silu", gated_mlp=True, position="rope")
_QWEN2 = dict(_LLAMA, family="qwen2", qkv_bias=True, tie_word_embeddings=True)
_GPT2 = dict(
    family="gpt2",
    norm_type="layer",
    norm_eps=1e-5,
    activation="gelu_new",
    gated_mlp=False,
    position="learned",
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    tie_word_embeddings=True,
)
BUILTIN_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(
        _LLAMA, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128
    ),
    "tiny-qwen2": dict(
        _QWEN2, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128
    ),
    "tiny-gpt2": dict(
        _GPT2,
        hidden_size=64,
        n_layers=2,
        n_heads=4,
        intermediate_size=256,
        max_position_embeddings=1024,
    ),
    # Qwen2-0.5B's shape (random init): the GPU benchmark's model (benchmarks/gpu/bench_gpu.py).
    "qwen2-0.5b": dict(
        _QWEN2,
        hidden_size=896,
        n_layers=24,
        n_heads=14,
        n_kv_heads=2,
        intermediate_size=4864,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
    ),
    "small-llama": dict(
        _LLAMA, hidden_size=512, n_layers=8, n_heads=8, n_kv_heads=4, intermediate_size=1376
    ),
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_CONFIGS)


def builtin_config(name: str, vocab_size: int, **overrides) -> TransformerConfig:
    """The built-in config `name` with the given vocabulary size (and any field overridden)."""
    if name not in BUILTIN_CONFIGS:
        guess = closest(name, BUILTIN_CONFIGS)
        hint = f". Did you mean '{guess}'?" if guess else ""
        raise ValueError(
            f"unknown built-in model config '{name}'. Known: {', '.join(builtin_names())}{hint}"
        )
    return TransformerConfig(**{**BUILTIN_CONFIGS[name], "vocab_size": vocab_size, **overrides})
