"""The learning-rate schedule shared by every backend: linear warmup, then constant, cosine or
linear decay down to `min_lr_ratio * lr`.

The schedule is a pure function of the optimizer step index, so its whole state is the step
counter the engine already saves (exact resume, and no scheduler object to keep in sync with
deepspeed's optimizer wrappers).
"""

from __future__ import annotations

import math

from realflow.engines.config import OptimizerConfig


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    """Number of warmup steps: `int(warmup_steps_proportion * total_steps)`."""
    return int(cfg.warmup_steps_proportion * total_steps)


def lr_factor(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """Multiplier of `cfg.lr` for the optimizer step with 0-based index `step`.

    With `w = warmup_steps(cfg, total_steps)` and `r = cfg.min_lr_ratio`:
    - `step < w`: `(step + 1) / w` (the last warmup step runs at the full lr);
    - then `p = min(1, (step - w) / max(1, total_steps - w))` and
      cosine: `r + (1 - r) * (1 + cos(pi * p)) / 2`, linear: `r + (1 - r) * (1 - p)`,
      constant: `1`.
    """
    w = warmup_steps(cfg, total_steps)
    if step < w:
        return (step + 1) / w
    if cfg.lr_scheduler_type == "constant":
        return 1.0
    progress = min(1.0, (step - w) / max(1, total_steps - w))
    r = cfg.min_lr_ratio
    if cfg.lr_scheduler_type == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.lr_scheduler_type == "linear":
        return r + (1.0 - r) * (1.0 - progress)
    raise ValueError(
        f"lr_scheduler_type {cfg.lr_scheduler_type!r} unknown; known: constant, cosine, linear"
    )


def lr_at(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """The learning rate of the optimizer step with 0-based index `step`."""
    return cfg.lr * lr_factor(cfg, step, total_steps)
