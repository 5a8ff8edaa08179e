"""The learning-rate schedule shared by every backend: linear warmup, then a registered decay
(constant, cosine, linear built in) down to `min_lr_ratio * lr`.

The schedule is a pure function of the optimizer step index, so its whole state is the step
counter the engine already saves (exact resume, and no scheduler object to keep in sync with
deepspeed's optimizer wrappers). A schedule of your own is a function of the progress through
the decay phase, registered by name:

    from realflow.api.registry import LR_SCHEDULES

    @LR_SCHEDULES.register("step_decay")
    def step_decay(progress: float, min_lr_ratio: float, every: float = 0.5) -> float:
        return max(min_lr_ratio, 0.1 ** int(progress / every))

and named with `<role>.optimizer.lr_scheduler_type=step_decay` (its keyword arguments in
`<role>.optimizer.lr_scheduler_args.*`). Every parameter group's LR is its own peak LR times
this factor.
"""

from __future__ import annotations

import math

from realflow.api.registry import LR_SCHEDULES
from realflow.engines.config import OptimizerConfig


@LR_SCHEDULES.register("constant")
def constant(progress: float, min_lr_ratio: float) -> float:
    return 1.0


@LR_SCHEDULES.register("cosine")
def cosine(progress: float, min_lr_ratio: float) -> float:
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@LR_SCHEDULES.register("linear")
def linear(progress: float, min_lr_ratio: float) -> float:
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    """Number of warmup steps: `int(warmup_steps_proportion * total_steps)`."""
    return int(cfg.warmup_steps_proportion * total_steps)


def lr_factor(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """Multiplier of the peak LRs for the optimizer step with 0-based index `step`.

    With `w = warmup_steps(cfg, total_steps)`:
    - `step < w`: `(step + 1) / w` (the last warmup step runs at the full lr);
    - then `schedule(p, cfg.min_lr_ratio, **cfg.lr_scheduler_args)` with
      `p = min(1, (step - w) / max(1, total_steps - w))`; built in: constant `1`,
      cosine `r + (1 - r) * (1 + cos(pi * p)) / 2`, linear `r + (1 - r) * (1 - p)`.
    """
    w = warmup_steps(cfg, total_steps)
    if step < w:
        return (step + 1) / w
    progress = min(1.0, (step - w) / max(1, total_steps - w))
    schedule = LR_SCHEDULES.get(cfg.lr_scheduler_type)
    return float(schedule(progress, cfg.min_lr_ratio, **dict(cfg.lr_scheduler_args)))


def lr_at(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """The learning rate (of the default parameter group) of the optimizer step with 0-based
    index `step`."""
    return cfg.lr * lr_factor(cfg, step, total_steps)
