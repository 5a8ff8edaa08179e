"""Typed configs of the engines: the optimizer and LR schedule, and the backend.

`validate()` returns every problem as a human-readable line naming the field and its value; it
never raises, so the config layer (realflow.api.config) can report all problems at once.
"""

from __future__ import annotations

import dataclasses
import math

from realflow.api.config import field_
from realflow.api.registry import closest

LR_SCHEDULERS = ("constant", "cosine", "linear")
BACKENDS = ("torch", "deepspeed")
ZERO_STAGES = (0, 1, 2, 3)


def _unknown(field: str, value: str, known: tuple[str, ...]) -> str:
    msg = f"{field} {value!r} unknown; known: {', '.join(known)}"
    guess = closest(str(value), known)
    return msg + (f" (did you mean {guess!r}?)" if guess else "")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW, a warmup then decay LR schedule, and gradient clipping."""

    lr: float = field_(2e-5, "peak learning rate (reached at the end of warmup)")
    weight_decay: float = field_(
        0.0, "AdamW decoupled weight decay (matrices only, not 1-D params)"
    )
    beta1: float = field_(0.9, "AdamW beta1")
    beta2: float = field_(0.95, "AdamW beta2")
    eps: float = field_(1e-5, "AdamW epsilon")
    lr_scheduler_type: str = field_(
        "cosine", "LR decay after warmup: constant, cosine or linear (down to min_lr_ratio * lr)"
    )
    warmup_steps_proportion: float = field_(
        0.02, "fraction of the total optimizer steps spent in linear warmup"
    )
    min_lr_ratio: float = field_(0.0, "final LR of the decay, as a fraction of lr")
    gradient_clipping: float = field_(1.0, "max global grad L2 norm; 0 disables clipping")

    def validate(self) -> list[str]:
        """Every problem, one line each; empty when the config is valid."""
        errors = []
        if not _finite(self.lr) or self.lr <= 0:
            errors.append(f"lr ({self.lr}) must be positive")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            errors.append(f"weight_decay ({self.weight_decay}) must be >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not _finite(value) or not 0.0 <= value < 1.0:
                errors.append(f"{name} ({value}) must be in [0, 1)")
        if not _finite(self.eps) or self.eps <= 0:
            errors.append(f"eps ({self.eps}) must be positive")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            errors.append(_unknown("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS))
        if not _finite(self.warmup_steps_proportion) or not 0 <= self.warmup_steps_proportion <= 1:
            errors.append(
                f"warmup_steps_proportion ({self.warmup_steps_proportion}) must be in [0, 1]"
            )
        if not _finite(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        if not _finite(self.gradient_clipping) or self.gradient_clipping < 0:
            errors.append(
                f"gradient_clipping ({self.gradient_clipping}) must be >= 0 (0 disables clipping)"
            )
        return errors


@dataclasses.dataclass
class EngineConfig:
    """Which machinery runs a model: plain torch or deepspeed ZeRO, precision, offload."""

    backend: str = field_("torch", "torch (AdamW in-process) or deepspeed (ZeRO stages 0-3)")
    zero_stage: int = field_(2, "deepspeed ZeRO stage 0, 1, 2 or 3 (deepspeed backend only)")
    bf16: bool = field_(False, "bf16 mixed precision (torch: autocast; deepspeed: bf16 weights)")
    offload: bool = field_(
        False, "move idle weights to CPU between calls (models never trained; no-op on CPU)"
    )

    def validate(self) -> list[str]:
        """Every problem, one line each; empty when the config is valid."""
        errors = []
        if self.backend not in BACKENDS:
            errors.append(_unknown("backend", self.backend, BACKENDS))
        if isinstance(self.zero_stage, bool) or self.zero_stage not in ZERO_STAGES:
            errors.append(f"zero_stage ({self.zero_stage}) must be 0, 1, 2 or 3")
        if not isinstance(self.bf16, bool):
            errors.append(f"bf16 ({self.bf16!r}) must be true or false")
        if not isinstance(self.offload, bool):
            errors.append(f"offload ({self.offload!r}) must be true or false")
        return errors
