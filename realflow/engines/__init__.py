"""Engines: the machinery under an interface (optimizer, LR schedule, gradient accumulation,
clipping, mixed precision, offload) for any `nn.Module`.

    from realflow.engines import EngineConfig, OptimizerConfig, build_train_engine

    engine = build_train_engine(module, EngineConfig(backend="deepspeed", zero_stage=2),
                                OptimizerConfig(lr=1e-5), total_train_steps=1000)
    stats = engine.train_batch(micro_batches, loss_fn, loss_weight_fn)

Importing this package does not import deepspeed; the deepspeed backend loads it when built.
"""

from realflow.engines.config import EngineConfig, OptimizerConfig
from realflow.engines.schedule import lr_at, lr_factor, warmup_steps
from realflow.engines.train import (
    EngineError,
    InferenceEngine,
    LossFn,
    LossWeightFn,
    TrainEngine,
    build_train_engine,
)

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
