"""Optimizers by name, and parameter groups by name pattern.

`<role>.optimizer.name` looks the optimizer up in `OPTIMIZERS`: every general-purpose
torch.optim class is registered under its lowercase name, and a plugin registers its own:

    from realflow.api.registry import OPTIMIZERS

    OPTIMIZERS.register("lion", Lion)   # any callable (param_groups, lr=..., **kwargs) -> Optimizer

Arguments: `lr` and `weight_decay` (per group), `betas=(beta1, beta2)` and `eps` for optimizers
whose constructor takes `betas`, and `optimizer.args.*` for the rest (checked against the
constructor's signature before anything is built).

Groups: each trainable parameter goes to the first `optimizer.param_groups` entry whose
`pattern` (an fnmatch glob) matches its name, else to the default group; within every group,
matrices (ndim >= 2) get the group's weight decay and 1-D parameters (biases, norm weights) none.
Each torch param group remembers its peak LR under "peak_lr"; the engine sets
`lr = peak_lr * schedule factor` before every step (realflow.engines.schedule).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from realflow.api.registry import OPTIMIZERS, closest
from realflow.engines.config import OptimizerConfig

# Registered name -> torch.optim class name. LBFGS (needs a closure), SparseAdam (sparse
# gradients) and Muon (2-D parameters only) do not fit a generic trainer and are left out.
TORCH_OPTIMIZERS = {
    "adadelta": "Adadelta",
    "adafactor": "Adafactor",
    "adagrad": "Adagrad",
    "adam": "Adam",
    "adamax": "Adamax",
    "adamw": "AdamW",
    "asgd": "ASGD",
    "nadam": "NAdam",
    "radam": "RAdam",
    "rmsprop": "RMSprop",
    "rprop": "Rprop",
    "sgd": "SGD",
}


class OptimizerError(ValueError):
    """A config that cannot build its optimizer (unknown argument, pattern matching nothing);
    `problems` lists each."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class TorchOptimizer:
    """A torch.optim class looked up when first used (Adafactor needs torch >= 2.5)."""

    def __init__(self, class_name: str):
        self.class_name = class_name
        self.__name__ = class_name

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        cls = getattr(torch.optim, self.class_name, None)
        if cls is None:
            raise OptimizerError(
                f"torch {torch.__version__} has no torch.optim.{self.class_name}; upgrade torch "
                "or pick another optimizer.name"
            )
        return cls

    def __call__(self, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return self.cls(params, **kwargs)


for _name, _cls in TORCH_OPTIMIZERS.items():
    OPTIMIZERS.register(_name, TorchOptimizer(_cls))


def _signature_of(factory: Callable) -> inspect.Signature:
    target = factory.cls if isinstance(factory, TorchOptimizer) else factory
    return inspect.signature(target)


def optimizer_kwargs(cfg: OptimizerConfig) -> dict[str, Any]:
    """The keyword arguments (besides the param groups and `lr`) the optimizer gets; an
    OptimizerError lists every argument it does not take (one problem per "; ")."""
    factory = OPTIMIZERS.get(cfg.name)
    params = _signature_of(factory).parameters
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [n for n in params if n not in ("self", "params", "lr")]
    kwargs: dict[str, Any] = {}
    problems = []
    if "betas" in params or takes_any:
        kwargs.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        problems += [
            f"args.{k}: set it with {'beta1/beta2' if k == 'betas' else k}"
            for k in ("betas", "eps")
            if k in cfg.args
        ]
    else:
        defaults = OptimizerConfig()
        problems += [
            f"{k} ({getattr(cfg, k)}) is set, but {cfg.name} takes no betas; pass its own "
            f"arguments in args (it takes {', '.join(known)})"
            for k in ("beta1", "beta2", "eps")
            if getattr(cfg, k) != getattr(defaults, k)
        ]
    for key, value in cfg.args.items():
        if key not in params and not takes_any:
            guess = closest(key, known)
            hint = f" (did you mean '{guess}'?)" if guess else ""
            problems.append(
                f"args.{key}: {cfg.name} takes no argument '{key}'{hint}; it takes "
                f"{', '.join(known)}"
            )
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    if problems:
        raise OptimizerError(problems)
    return kwargs


def named_param_groups(module: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Torch param groups of the module's trainable parameters (see the module docstring):
    the default group first (matrices, then 1-D parameters), then each configured group.
    Every group dict holds `params`, `lr` = `peak_lr`, `weight_decay` and `names`."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    members: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(len(cfg.param_groups) + 1)]
    for name, p in trainable:
        index = next(
            (i for i, g in enumerate(cfg.param_groups) if fnmatch.fnmatchcase(name, g.pattern)),
            -1,
        )
        members[index + 1].append((name, p))
    unmatched = [g.pattern for g, m in zip(cfg.param_groups, members[1:]) if not m]
    if unmatched:
        sample = ", ".join(n for n, _ in trainable[:6])
        raise OptimizerError(
            f"optimizer.param_groups patterns {unmatched} match no trainable parameter (or only "
            f"ones an earlier pattern took); trainable names look like: {sample}"
        )
    settings = [(cfg.lr, cfg.weight_decay)] + [
        (
            cfg.lr if g.lr is None else g.lr,
            cfg.weight_decay if g.weight_decay is None else g.weight_decay,
        )
        for g in cfg.param_groups
    ]
    groups = []
    for group, (lr, wd) in zip(members, settings):
        for decays in (True, False):
            chosen = [(n, p) for n, p in group if (p.ndim >= 2) == decays]
            if chosen:
                groups.append(
                    {
                        "params": [p for _, p in chosen],
                        "names": [n for n, _ in chosen],
                        "lr": lr,
                        "peak_lr": lr,
                        "weight_decay": wd if decays else 0.0,
                    }
                )
    if not groups:
        raise OptimizerError(f"{type(module).__name__} has no trainable parameter to optimize")
    return groups


def make_optimizer(module: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer every backend uses (deepspeed gets it as a client optimizer)."""
    kwargs = optimizer_kwargs(cfg)
    groups = named_param_groups(module, cfg)
    return OPTIMIZERS.get(cfg.name)(groups, lr=cfg.lr, **kwargs)


def set_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's LR to its peak LR times the schedule `factor`."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor
