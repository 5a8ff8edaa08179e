"""A model shard's parameters as one flat buffer, and where each full parameter's block sits.

    flat = FlatParams(model)    # params become views into flat.buffer (same Parameter objects)
    flat.release()              # free the storage (a layout's copy no longer needed)
    flat.allocate()             # get it back (contents undefined) before receiving weights

`param_slots(model)` / `slots_for(config, head, tp, pp, tp_rank, pp_stage)` list, in buffer order,
each local parameter's canonical full-model name, its block (`Rect`) of the full tensor and its
offset: the input of the realloc planner. Both come from the same module construction, so they
always agree with the layers' local shapes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from realflow.models.config import TransformerConfig
from realflow.models.transformer import PackedTransformer
from realflow.parallel.partition import Rect, ShardSpec, canonical_name, param_rect


@dataclass(frozen=True)
class Slot:
    """One local parameter in a shard's flat buffer: elements [offset, offset + numel) hold
    block `rect` (row-major) of full parameter `key` (shape `full_shape`)."""

    name: str
    key: str
    full_shape: tuple[int, ...]
    rect: Rect
    offset: int

    @property
    def numel(self) -> int:
        return self.rect.numel


def config_key(config: TransformerConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True, default=str)


@functools.lru_cache(maxsize=64)
def _full_shapes(key: str, head: str) -> dict[str, tuple[int, ...]]:
    config = TransformerConfig(**json.loads(key))
    with torch.device("meta"):
        model = PackedTransformer(config, head, init_weights=False)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def full_param_shapes(config: TransformerConfig, head: str) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every parameter of the whole model (a tied head is one)."""
    return _full_shapes(config_key(config), head)


def _slots(model: PackedTransformer) -> list[Slot]:
    cfg = model.config
    spec = model.shard or ShardSpec()
    shapes = full_param_shapes(cfg, model.head)
    out, offset = [], 0
    for name, p in model.named_parameters():
        key = canonical_name(name, cfg.tie_word_embeddings)
        rect = param_rect(key, shapes[key], cfg, spec.tp_size, spec.tp_rank)
        local = tuple(p.shape) if p.dim() == 2 else (p.numel(), 1)
        if local != (rect.rows, rect.cols):
            raise AssertionError(f"{name}: local shape {tuple(p.shape)} != partition {rect}")
        out.append(Slot(name, key, shapes[key], rect, offset))
        offset += rect.numel
    return out


def param_slots(model: nn.Module) -> list[Slot]:
    """The slots of a built (possibly sharded) PackedTransformer, in `named_parameters` order."""
    if not isinstance(model, PackedTransformer):
        raise TypeError(f"param_slots needs a PackedTransformer, got {type(model).__name__}")
    return _slots(model)


@functools.lru_cache(maxsize=256)
def cached_slots(key: str, head: str, tp: int, pp: int, tp_rank: int, stage: int) -> tuple:
    """`slots_for` keyed by `config_key(config)` (cached)."""
    config = TransformerConfig(**json.loads(key))
    spec = ShardSpec(tp_rank=tp_rank, tp_size=tp, pp_stage=stage, pp_size=pp)
    with torch.device("meta"):
        model = PackedTransformer(config, head, spec, init_weights=False)
    return tuple(_slots(model))


def slots_for(
    config: TransformerConfig, head: str, tp: int, pp: int, tp_rank: int, pp_stage: int
) -> list[Slot]:
    """The slots a worker at (tp_rank, pp_stage) of a tp x pp layout holds (built on meta)."""
    return list(cached_slots(config_key(config), head, tp, pp, tp_rank, pp_stage))


class FlatParams:
    """The parameters of one model shard as views into one contiguous 1-D buffer.

    The module keeps its Parameter objects (an optimizer built on them stays valid); only their
    storage moves. All parameters must share one dtype and device; move or cast the module
    before flattening it (`.to()` afterwards would detach the parameters from the buffer).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.slots = param_slots(model)
        params = dict(model.named_parameters())
        self.params = [params[s.name] for s in self.slots]
        dtypes = {(p.dtype, p.device) for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(
                f"FlatParams needs one dtype and device, got {sorted(map(str, dtypes))}"
            )
        ((self.dtype, self.device),) = dtypes
        self.numel = sum(s.numel for s in self.slots)
        self.buffer = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for s, p in zip(self.slots, self.params):
                self.buffer[s.offset : s.offset + s.numel].copy_(p.reshape(-1))
        self._bind()

    def _bind(self) -> None:
        for s, p in zip(self.slots, self.params):
            p.data = self.buffer[s.offset : s.offset + s.numel].view(self._shape(s))

    @staticmethod
    def _shape(s: Slot) -> tuple[int, ...]:
        return (s.rect.rows, s.rect.cols) if len(s.full_shape) == 2 else (s.rect.rows,)

    @property
    def released(self) -> bool:
        return self.buffer.numel() == 0 and self.numel > 0

    def release(self) -> None:
        """Free the storage; parameters become empty until `allocate`."""
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        self.buffer = empty
        for p in self.params:
            p.data = empty

    def allocate(self) -> None:
        """Storage for the parameters again (uninitialised) when released; else a no-op."""
        if not self.released:
            return
        self.buffer = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self._bind()

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()
