"""The architecture description of a realflow transformer, independent of any HF family.

`TransformerConfig` says what to build (sizes, norm, activation, positions, biases, tying) and how
to run it (attention backend, gradient checkpointing, autocast). HF families convert their
config.json to and from it (see `realflow.models.families`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ROPE_TYPES = ("default", "linear", "llama3")
ATTN_IMPLS = (
    "auto",
    "flash",
    "torch_varlen",
    "sdpa_bucketed",
    "sdpa_varlen",
    "sdpa_grouped",
    "sdpa_blockmask",
)
HEADS = ("lm", "critic", "reward")


@dataclass
class RopeScaling:
    """Rotary-embedding frequency scaling, as in HF's `rope_parameters` / `rope_scaling`.

    `linear` divides every frequency by `factor`; `llama3` divides low frequencies by `factor`
    and interpolates the middle band (Llama 3.1).
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class TransformerConfig:
    """Shape and run options of a packed decoder-only transformer.

    `family` names the HF family (in `MODEL_FAMILIES`) used to save the model as an HF directory.
    """

    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    head_dim: int | None = None  # None: hidden_size // n_heads
    max_position_embeddings: int = 2048
    family: str = "llama"
    # Architecture switches.
    norm_type: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    activation: str = "silu"  # "silu" | "gelu_new" | "gelu" | "relu"
    gated_mlp: bool = True  # gate_proj * up_proj (llama) or a plain 2-layer MLP (gpt2)
    position: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    critic_head_bias: bool = (
        True  # HF *ForTokenClassification has a bias; *ForSequenceClassification not
    )
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Run options (not architecture).
    attn_impl: str = "auto"
    gradient_checkpointing: bool = False
    autocast_dtype: str | None = None  # e.g. "bfloat16": run matmuls under torch.autocast
    extra_hf: dict = field(default_factory=dict)  # HF config keys kept verbatim for saving

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.hidden_size // self.n_heads
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        errors = self.validation_errors()
        if errors:
            raise ValueError("invalid TransformerConfig:\n  " + "\n  ".join(errors))

    def validation_errors(self) -> list[str]:
        """Every rule the config breaks, one message each (empty when valid)."""
        e = []
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                e.append(f"{name} ({getattr(self, name)}) must be positive")
        if self.n_kv_heads <= 0 or self.n_heads % max(self.n_kv_heads, 1):
            e.append(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim is not None and self.head_dim % 2 and self.position == "rope":
            e.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        choices = {
            "norm_type": ("rms", "layer"),
            "activation": ("silu", "gelu_new", "gelu", "relu"),
            "position": ("rope", "learned"),
            "attn_impl": ATTN_IMPLS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                e.append(f"{name} ({getattr(self, name)!r}) must be one of {allowed}")
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in ROPE_TYPES:
            e.append(
                f"rope_scaling.rope_type ({self.rope_scaling.rope_type!r}) must be one of "
                f"{ROPE_TYPES}"
            )
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            e.append(f"autocast_dtype ({self.autocast_dtype!r}) must be None, bfloat16 or float16")
        return e

    @property
    def eos_token_ids(self) -> list[int]:
        """The EOS ids as a list (HF allows an int or a list)."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def replace(self, **changes) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
