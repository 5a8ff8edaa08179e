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
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    """Which machinery runs a model: plain torch or deepspeed ZeRO, precision, offload.

    Precision of a trained model. Its master weights and optimizer state are fp32 whatever dtype
    the weights arrive in (a bf16 checkpoint is upcast, exactly); `bf16` only changes the
    compute: torch autocasts the fp32 weights per op, deepspeed keeps bf16 copies of the weights
    next to fp32 masters in its optimizer. Persistent bytes per parameter, with AdamW:
    - torch: 16 = fp32 weights 4 + fp32 grads 4 + two fp32 moments 8 (bf16 autocast adds
      transient bf16 copies of the weights during a forward);
    - deepspeed bf16: 16 to 20 = bf16 weights 2 + fp32 masters 4 + moments 8 + gradients (bf16
      2, and an fp32 accumulation buffer 4 where the stage keeps one); ZeRO-1 divides the
      masters and moments by the data-parallel size, ZeRO-2 also the gradients, ZeRO-3 also the
      weights.
    `save_dtype` is only the dtype of the saved HF weights; when it is lower than fp32 the fp32
    masters also go into the engine state (4 more bytes per parameter in the checkpoint), so
    that a resumed run is exact.
    """

    backend: str = field_("torch", "torch (AdamW in-process) or deepspeed (ZeRO stages 0-3)")
    zero_stage: int = field_(2, "deepspeed ZeRO stage 0, 1, 2 or 3 (deepspeed backend only)")
    bf16: bool = field_(
        False,
        "bf16 compute over fp32 master weights (torch: autocast; deepspeed: bf16 weight copies)",
    )
    offload: bool = field_(
        False,
        "move weights (and a trained model's optimizer state) to CPU between calls; "
        "nothing moves on CPU; not supported with the deepspeed backend",
    )
    save_dtype: str = field_(
        "auto",
        "dtype of saved weights: auto (the dtype the weights were loaded in), float32, "
        "bfloat16 or float16",
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
        if self.save_dtype not in SAVE_DTYPES:
            errors.append(_unknown("save_dtype", self.save_dtype, SAVE_DTYPES))
        return errors

    def train_problems(self) -> list[str]:
        """Problems of this config for a model that is trained (on top of `validate()`)."""
        if self.offload and self.backend == "deepspeed":
            return [
                "offload (true) is not supported with backend 'deepspeed': realflow moves a "
                "trained model's weights and optimizer state itself only for backend 'torch'; "
                "use backend=torch with offload, or ZeRO-3 (zero_stage=3) to spread the "
                "weights over ranks (a role that is never trained does not use the backend: "
                "leave it at torch)"
            ]
        return []
