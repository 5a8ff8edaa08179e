"""What the train / inference engines and their backends share: errors, a module's device and
dtypes, fp32 master weights, bf16 autocast, the data-parallel group's size, state copies and
loading weights into a module (see realflow.engines.train)."""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("realflow.engines.train")


class EngineError(ValueError):
    """A misuse of an engine: bad configs, empty batches, a state dict of another backend."""


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU for a module without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def parameter_dtype(module: nn.Module, params: list[nn.Parameter] | None = None) -> torch.dtype:
    """The dtype of the module's floating parameters (or of `params`; float32 when there are
    none); parameters of several floating dtypes are an error."""
    params = list(module.parameters()) if params is None else params
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise EngineError(
            f"{type(module).__name__} has parameters of several dtypes ({names}); give the "
            "engine a module whose parameters share one dtype"
        )
    return dtypes.pop() if dtypes else torch.float32


def arrived_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the module's weights arrived in: that of its frozen parameters when it has
    some (the base weights under adapters), else that of all of them."""
    frozen = [p for p in module.parameters() if not p.requires_grad]
    return parameter_dtype(module, frozen or None)


def upcast_to_fp32(module: nn.Module) -> torch.dtype:
    """Make the floating trainable parameters fp32 in place (exact from bf16/fp16) and return
    the dtype the weights arrived in (`arrived_dtype`). Frozen parameters (base weights under
    adapters) and buffers are left as they are."""
    dtype = arrived_dtype(module)
    upcast = 0
    for p in module.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            upcast += 1
    if upcast:
        logger.info(
            "upcast %d trainable %s parameters from %s to fp32 master weights",
            upcast,
            type(module).__name__,
            dtype,
        )
    return dtype


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when enabled, else a null context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def dp_world(dp_group: Any) -> tuple[bool, int]:
    """(whether there is a data-parallel group to talk to, its size)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False, 1
    size = dist.get_world_size(group=dp_group)
    return size > 1, size


def clone_state(obj: Any) -> Any:
    """A copy of a (nested dict / list / tuple) state whose tensors are detached clones."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return type(obj)((k, clone_state(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return copy.deepcopy(obj)


def trainable_state_dict(module: nn.Module, full: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The entries of the module state dict `full` that are trainable parameters."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in full.items() if k in names}


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the module in place: all of its state, or exactly its trainable
    parameters when it has frozen ones (the base weights under adapters are rebuilt from their
    checkpoint, not saved in the engine state)."""
    if not any(not p.requires_grad for p in module.parameters()):
        module.load_state_dict(weights)
        return
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise EngineError(
            f"weights to load hold {len(weights)} entries, the module has {len(trainable)} "
            f"trainable parameters: missing {sorted(trainable - set(weights))[:5]}, "
            f"unexpected {sorted(set(weights) - trainable)[:5]}"
        )
    module.load_state_dict(weights, strict=False)
