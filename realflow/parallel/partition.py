"""Which part of every parameter a (tensor-parallel rank, pipeline stage) holds, by name.

The single source of truth for sharding: the model layers ask it for their local sizes, the
realloc planner for the block of each full parameter a rank holds (`param_rect`).

Tensor parallel (Megatron style), with `hd` the head dim:
  - column-parallel (rows of the weight split): q_proj (by query head), k_proj / v_proj (by
    kv head: split when tp divides n_kv_heads, else each rank holds one kv head, replicated over
    tp / n_kv_heads ranks), gate_proj / up_proj (by intermediate unit), embed_tokens and
    lm_head (by vocab row; uneven when tp does not divide the vocab);
  - row-parallel (columns split, bias replicated): o_proj, down_proj;
  - replicated: norms, learned positions, the critic / reward `score` head.
Pipeline parallel: stage s holds blocks `stage_layers(n_layers, pp, s)`; the first stage holds
the embeddings, the last the final norm and the head (and, when the embedding is tied to the
LM head, its own copy of it, named `lm_head.weight`).

Imports nothing heavy (no torch), so models can import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from realflow.parallel.layout import Layout


@dataclass(frozen=True)
class ShardSpec:
    """The part of a model one worker builds: its tp rank / size and pipeline stage / count.

    `tp_group` is the torch.distributed group of its tensor-parallel peers (None for a model
    built only to read shapes, e.g. on the meta device).
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_stage: int = 0
    pp_size: int = 1
    tp_group: Any = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.pp_stage < self.pp_size):
            raise ValueError(
                f"tp_rank {self.tp_rank} / tp_size {self.tp_size} and pp_stage {self.pp_stage} / "
                f"pp_size {self.pp_size} must satisfy 0 <= rank < size"
            )

    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_stage == self.pp_size - 1

    @property
    def is_trivial(self) -> bool:
        """True for tp=1, pp=1: the whole model, built exactly as without a spec."""
        return self.tp_size == 1 and self.pp_size == 1


def split_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """[start, stop) of part i when n items are split into `parts` contiguous parts; the first
    n % parts parts hold one item more."""
    base, extra = divmod(n, parts)
    start = i * base + min(i, extra)
    return start, start + base + (1 if i < extra else 0)


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """The blocks of pipeline stage `stage` (earlier stages get the extra block)."""
    return range(*split_range(n_layers, pp, stage))


def vocab_range(vocab_size: int, tp: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the vocab rows a tp rank holds (uneven when tp does not divide it)."""
    return split_range(vocab_size, tp, rank)


def q_head_range(n_heads: int, tp: int, rank: int) -> tuple[int, int]:
    per = n_heads // tp
    return rank * per, (rank + 1) * per


def kv_head_range(n_kv_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """The kv heads a tp rank holds: its share when tp divides n_kv_heads, else the one kv head
    its query heads read (replicated on tp // n_kv_heads ranks)."""
    if n_kv_heads % tp == 0:
        per = n_kv_heads // tp
        return rank * per, (rank + 1) * per
    head = rank // (tp // n_kv_heads)
    return head, head + 1


def layout_errors(config: Any, layout: Layout) -> list[str]:
    """Every reason `layout` cannot shard a model of `config` (a TransformerConfig)."""
    tp, pp, e = layout.tp, layout.pp, []
    if config.n_heads % tp:
        e.append(f"tp ({tp}) must divide n_heads ({config.n_heads}) for layout {layout}")
    kv = config.n_kv_heads
    if kv % tp and tp % kv:
        e.append(f"tp ({tp}) and n_kv_heads ({kv}) must divide one another for layout {layout}")
    if config.intermediate_size % tp:
        e.append(
            f"tp ({tp}) must divide intermediate_size ({config.intermediate_size}) for layout "
            f"{layout}"
        )
    if config.vocab_size < tp:
        e.append(f"tp ({tp}) must be <= vocab_size ({config.vocab_size}) for layout {layout}")
    if pp > config.n_layers:
        e.append(f"pp ({pp}) must be <= n_layers ({config.n_layers}) for layout {layout}")
    return e


def check_layout(config: Any, layout: Layout) -> None:
    """Raise ValueError listing every `layout_errors`."""
    errors = layout_errors(config, layout)
    if errors:
        raise ValueError("; ".join(errors))


# ---- the block of a full parameter a worker holds -------------------------------------------


@dataclass(frozen=True)
class Rect:
    """Rows [r0, r1) x columns [c0, c1) of a parameter viewed as 2-D (a 1-D one has 1 column)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    @property
    def cols(self) -> int:
        return self.c1 - self.c0

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def intersect(self, other: Rect) -> Rect | None:
        r0, r1 = max(self.r0, other.r0), min(self.r1, other.r1)
        c0, c1 = max(self.c0, other.c0), min(self.c1, other.c1)
        if r0 >= r1 or c0 >= c1:
            return None
        return Rect(r0, r1, c0, c1)


_ROWS, _COLS, _FULL = "rows", "cols", "full"
# (regex on the canonical parameter name, split axis, what is split)
_RULES: list[tuple[str, str, str]] = [
    (r"embed_tokens\.weight", _ROWS, "vocab"),
    (r"lm_head\.weight", _ROWS, "vocab"),
    (r"embed_positions\.weight", _FULL, ""),
    (r"layers\.\d+\.attn\.q_proj\.(weight|bias)", _ROWS, "q"),
    (r"layers\.\d+\.attn\.[kv]_proj\.(weight|bias)", _ROWS, "kv"),
    (r"layers\.\d+\.attn\.o_proj\.weight", _COLS, "q"),
    (r"layers\.\d+\.mlp\.(gate|up)_proj\.(weight|bias)", _ROWS, "ffn"),
    (r"layers\.\d+\.mlp\.down_proj\.weight", _COLS, "ffn"),
    (r"layers\.\d+\.(attn\.o_proj|mlp\.down_proj)\.bias", _FULL, ""),
    (r"(layers\.\d+\.(attn|mlp)_norm|norm)\.(weight|bias)", _FULL, ""),
    (r"score\.(weight|bias)", _FULL, ""),
]


def _split(config: Any, what: str, tp: int, rank: int) -> tuple[int, int]:
    hd = config.head_dim
    if what == "vocab":
        return vocab_range(config.vocab_size, tp, rank)
    if what == "q":
        h0, h1 = q_head_range(config.n_heads, tp, rank)
        return h0 * hd, h1 * hd
    if what == "kv":
        h0, h1 = kv_head_range(config.n_kv_heads, tp, rank)
        return h0 * hd, h1 * hd
    return split_range(config.intermediate_size, tp, rank)  # "ffn"


def param_rect(key: str, full_shape: tuple[int, ...], config: Any, tp: int, rank: int) -> Rect:
    """The block of full parameter `key` (canonical name, shape `full_shape`) that tp rank
    `rank` of `tp` holds."""
    rows = full_shape[0]
    cols = full_shape[1] if len(full_shape) == 2 else 1
    if len(full_shape) > 2:
        raise ValueError(f"parameter {key} has {len(full_shape)} dims; sharding handles 1 or 2")
    for pattern, axis, what in _RULES:
        if re.fullmatch(pattern, key):
            if axis == _FULL or tp == 1:
                return Rect(0, rows, 0, cols)
            a, b = _split(config, what, tp, rank)
            return Rect(a, b, 0, cols) if axis == _ROWS else Rect(0, rows, a, b)
    raise ValueError(
        f"no tensor-parallel rule for parameter {key!r}; add one to _RULES in "
        "realflow/parallel/partition.py"
    )


def canonical_name(name: str, tied_embeddings: bool) -> str:
    """The full-model name of a local parameter: a pipeline stage's own copy of a tied LM head
    is the embedding."""
    if tied_embeddings and name == "lm_head.weight":
        return "embed_tokens.weight"
    return name
