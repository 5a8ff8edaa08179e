"""Typed configs of the engines: the optimizer and LR schedule, the backend, and adapters.

`validate()` returns every problem as a human-readable line naming the field and its value; it
never raises, so the config layer (realflow.api.config) can report all problems at once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from realflow.api.config import field_
from realflow.api.registry import closest

BACKENDS = ("torch", "deepspeed")
ZERO_STAGES = (0, 1, 2, 3)
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _unknown(field: str, value: str, known: tuple[str, ...]) -> str:
    msg = f"{field} {value!r} unknown; known: {', '.join(known)}"
    guess = closest(str(value), known)
    return msg + (f" (did you mean {guess!r}?)" if guess else "")


def _call_problems(field: str, fn: Any, args: tuple, kwargs: dict[str, Any]) -> list[str]:
    """Whether `fn(*args, **kwargs)` binds; else the problem, with the keywords fn takes."""
    import inspect

    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError as e:
        params = list(inspect.signature(fn).parameters)[len(args) :]
        return [f"{field} {dict(kwargs)}: {e}; {getattr(fn, '__name__', fn)} takes {params}"]
    return []


def _optimizer_problems(cfg: OptimizerConfig) -> list[str]:
    """The arguments the named optimizer does not take (imports torch: only for a name other
    than adamw, or optimizer args)."""
    from realflow.engines.optimizers import OptimizerError, optimizer_kwargs

    try:
        optimizer_kwargs(cfg)
    except OptimizerError as e:
        return e.problems
    return []


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclasses.dataclass
class ParamGroupConfig:
    """Trainable parameters whose realflow names match `pattern`, with their own peak LR and
    weight decay (the first group a parameter matches wins; the others use the optimizer's)."""

    pattern: str = field_(
        "",
        "fnmatch glob on parameter names, e.g. 'embed_tokens.*', 'layers.0.*', '*.lora_B.*' "
        "(names as in the model's state dict; with adapters, peft's: '*.lora_A.default.weight')",
    )
    lr: float | None = field_(None, "peak LR of the group (scaled by the schedule); None: lr")
    weight_decay: float | None = field_(
        None,
        "weight decay of the group's matrices (1-D parameters never decay); None: weight_decay",
    )


@dataclasses.dataclass
class OptimizerConfig:
    """The optimizer (AdamW by default), parameter groups, a warmup then decay LR schedule, and
    gradient clipping."""

    name: str = field_(
        "adamw",
        "optimizer: adamw, any torch.optim one by its lowercase name (adam, sgd, rmsprop, "
        "adafactor, ...) or one registered in OPTIMIZERS; its own arguments go in args",
    )
    lr: float = field_(2e-5, "peak learning rate (reached at the end of warmup)")
    weight_decay: float = field_(
        0.0, "decoupled weight decay of matrices (1-D parameters: biases, norms never decay)"
    )
    beta1: float = field_(0.9, "beta1 of optimizers taking betas (adamw, adam, nadam, ...)")
    beta2: float = field_(0.95, "beta2 of optimizers taking betas")
    eps: float = field_(1e-5, "epsilon of optimizers taking betas")
    args: dict[str, Any] = field_(
        {},
        "more keyword arguments of the optimizer, e.g. args.momentum=0.9 for sgd (lr and "
        "weight_decay have their own keys)",
    )
    param_groups: list[ParamGroupConfig] = field_(
        [],
        "parameter groups by name pattern, e.g. [{pattern: 'embed_tokens.*', lr: 1e-5}]",
    )
    lr_scheduler_type: str = field_(
        "cosine",
        "LR decay after warmup: constant, cosine, linear (down to min_lr_ratio * lr) or one "
        "registered in LR_SCHEDULES",
    )
    lr_scheduler_args: dict[str, Any] = field_({}, "keyword arguments of a registered LR schedule")
    warmup_steps_proportion: float = field_(
        0.02, "fraction of the total optimizer steps spent in linear warmup"
    )
    min_lr_ratio: float = field_(0.0, "final LR of the decay, as a fraction of lr")
    gradient_clipping: float = field_(1.0, "max global grad L2 norm; 0 disables clipping")

    def validate(self) -> list[str]:
        """Every problem, one line each; empty when the config is valid."""
        from realflow.api.registry import LR_SCHEDULES, OPTIMIZERS

        errors = []
        if self.name not in OPTIMIZERS:
            errors.append(_unknown("name", self.name, tuple(OPTIMIZERS.names())))
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
        for key in ("lr", "weight_decay", "params"):
            if key in self.args:
                errors.append(f"args.{key}: set it with its own key, not in args")
        if self.name in OPTIMIZERS and (self.name != "adamw" or self.args):
            errors += _optimizer_problems(self)
        errors += self._group_problems()
        if self.lr_scheduler_type not in LR_SCHEDULES:
            errors.append(
                _unknown("lr_scheduler_type", self.lr_scheduler_type, tuple(LR_SCHEDULES.names()))
            )
        else:
            errors += _call_problems(
                "lr_scheduler_args",
                LR_SCHEDULES.get(self.lr_scheduler_type),
                (0.0, self.min_lr_ratio),
                self.lr_scheduler_args,
            )
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

    def _group_problems(self) -> list[str]:
        errors = []
        for i, group in enumerate(self.param_groups):
            where = f"param_groups[{i}]"
            if not group.pattern:
                errors.append(f"{where}.pattern is empty; give a glob such as 'embed_tokens.*'")
            if group.lr is not None and (not _finite(group.lr) or group.lr <= 0):
                errors.append(f"{where}.lr ({group.lr}) must be positive")
            wd = group.weight_decay
            if wd is not None and (not _finite(wd) or wd < 0):
                errors.append(f"{where}.weight_decay ({wd}) must be >= 0")
            if group.lr is None and wd is None:
                errors.append(f"{where} ({group.pattern!r}) sets neither lr nor weight_decay")
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
    generate_merged: bool = field_(
        True,
        "a model with adapters generates with them merged into a temporary copy of the adapted "
        "weights (faster decoding); false: through the adapter layers",
    )
    save_merged: bool = field_(
        False, "a model with adapters also saves the merged HF model (under <dir>/merged)"
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


# ---- adapters -----------------------------------------------------------------------------------

LORA_BIAS = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"


@dataclasses.dataclass
class LoraSettings:
    """LoRA through peft on a trained role's linear layers (rank 0: full fine-tuning)."""

    rank: int = field_(0, "LoRA rank r; 0: no LoRA (every weight is trained)", ge=0)
    alpha: float = field_(16.0, "LoRA alpha: the low-rank update is scaled by alpha / rank", gt=0)
    dropout: float = field_(0.0, "dropout on the input of the LoRA path", ge=0.0)
    target_modules: list[str] = field_(
        [ALL_LINEAR],
        "modules to adapt by name (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
        "down_proj, or a dotted path such as layers.0.attn.q_proj) or 'all-linear': every "
        "projection of the blocks, never the LM or value head",
    )
    bias: str = field_("none", "biases trained with the adapters", choices=LORA_BIAS)


@dataclasses.dataclass
class PeftSettings:
    """Any peft method registered in TUNERS (lora, dora, ia3, loha, lokr, ...), its peft config
    arguments passed through."""

    method: str = field_("", "tuner name in TUNERS (e.g. dora, ia3); empty: none")
    target_modules: list[str] = field_(
        [ALL_LINEAR], "modules to adapt, as lora.target_modules ('all-linear' by default)"
    )
    args: dict[str, Any] = field_(
        {},
        "keyword arguments of the method's peft config, e.g. args.r=8 args.lora_alpha=16 (dora), "
        "args.feedforward_modules=[down_proj] (ia3)",
    )


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The adapters of one role: a TUNERS name, its target modules and peft config arguments."""

    method: str
    target_modules: tuple[str, ...]
    args: dict[str, Any]


def adapter_spec(lora: LoraSettings, peft: PeftSettings) -> AdapterSpec | None:
    """The adapters `lora.*` / `peft.*` ask for (None: full fine-tuning); see
    `adapter_problems` for the rules."""
    if lora.rank > 0:
        args = dict(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias)
        return AdapterSpec("lora", tuple(lora.target_modules), args)
    if peft.method:
        return AdapterSpec(peft.method, tuple(peft.target_modules), dict(peft.args))
    return None


def adapter_problems(lora: LoraSettings, peft: PeftSettings) -> list[str]:
    """Problems of a role's adapter keys (names are checked without importing peft)."""
    from realflow.api.registry import TUNERS

    problems = []
    if lora.rank > 0 and peft.method:
        problems.append(
            f"lora.rank ({lora.rank}) and peft.method ({peft.method!r}) both ask for adapters; "
            "use one (LoRA through peft: peft.method=lora peft.args.r=...)"
        )
    if peft.method and peft.method not in TUNERS:
        problems.append("peft." + _unknown("method", peft.method, tuple(TUNERS.names())))
    if "target_modules" in peft.args:
        problems.append("peft.args.target_modules: set it with peft.target_modules")
    if not peft.method and peft.args:
        problems.append(f"peft.args {dict(peft.args)} are set but peft.method is empty")
    for prefix, targets in (("lora", lora.target_modules), ("peft", peft.target_modules)):
        if not targets:
            problems.append(f"{prefix}.target_modules is empty; name modules or 'all-linear'")
        if ALL_LINEAR in targets and len(targets) > 1:
            problems.append(
                f"{prefix}.target_modules {list(targets)}: 'all-linear' already names every "
                "projection; give it alone"
            )
    return problems
