"""Engines: the machinery under an interface (optimizer, LR schedule, gradient accumulation,
clipping, mixed precision, offload) for any `nn.Module`.

    from realflow.engines import EngineConfig, OptimizerConfig, build_train_engine

    engine = build_train_engine(module, EngineConfig(backend="deepspeed", zero_stage=2),
                                OptimizerConfig(lr=1e-5), total_train_steps=1000)
    stats = engine.train_batch(micro_batches, loss_fn, loss_weight_fn)

Importing this package does not import deepspeed; the deepspeed backend loads it when built.
"""

import importlib
from typing import Any

_EXPORTS = {
    "EngineConfig": "realflow.engines.config",
    "OptimizerConfig": "realflow.engines.config",
    "lr_at": "realflow.engines.schedule",
    "lr_factor": "realflow.engines.schedule",
    "warmup_steps": "realflow.engines.schedule",
    "EngineError": "realflow.engines.train",
    "InferenceEngine": "realflow.engines.train",
    "LossFn": "realflow.engines.train",
    "LossWeightFn": "realflow.engines.train",
    "TrainEngine": "realflow.engines.train",
    "build_train_engine": "realflow.engines.train",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that configs (realflow.engines.config) load without torch.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'realflow.engines' has no attribute '{name}'")


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
