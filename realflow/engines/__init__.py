"""Engines: the machinery under an interface (optimizer, LR schedule, gradient accumulation,
clipping, mixed precision, offload) for any `nn.Module`.

    from realflow.engines import EngineConfig, OptimizerConfig, build_train_engine

    engine = build_train_engine(module, EngineConfig(backend="deepspeed", zero_stage=2),
                                OptimizerConfig(lr=1e-5), total_train_steps=1000)
    stats = engine.train_batch(micro_batches, loss_fn, loss_weight_fn)

Importing this package is cheap: the configs and the schedule import no torch, the engines load
torch on first access, and deepspeed loads only when a deepspeed engine is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from realflow.engines.config import EngineConfig, OptimizerConfig
from realflow.engines.schedule import lr_at, lr_factor, warmup_steps

if TYPE_CHECKING:
    from realflow.engines.train import (
        EngineError,
        InferenceEngine,
        LossFn,
        LossWeightFn,
        TrainEngine,
        build_train_engine,
    )

_LAZY = {
    "EngineError",
    "InferenceEngine",
    "LossFn",
    "LossWeightFn",
    "TrainEngine",
    "build_train_engine",
}

__all__ = [
    "EngineConfig",
    "EngineError",
    "InferenceEngine",
    "LossFn",
    "LossWeightFn",
    "OptimizerConfig",
    "TrainEngine",
    "build_train_engine",
    "lr_at",
    "lr_factor",
    "warmup_steps",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("realflow.engines.train"), name)
    raise AttributeError(f"module 'realflow.engines' has no attribute {name!r}")
