"""Offload: a model's weights, and a trained model's optimizer state, leave the accelerator
between calls and come back before the next one.

    offloader = Offloader("actor", device, enabled=True, move=lambda d: move_train_state(m, opt, d))
    offloader.offload()   # after a call: everything on CPU
    offloader.onload()    # before a call: everything back on `device`

A model on CPU has nothing to move: the offloader says so once in the log and does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")


def _follows_param(group: dict, key: str) -> bool:
    """Whether an optimizer state entry lives on its parameter's device. AdamW keeps its `step`
    counters on CPU unless it is capturable or fused."""
    return key != "step" or bool(group.get("capturable") or group.get("fused"))


def move_train_state(
    module: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device | str
) -> None:
    """Move the module's parameters, gradients and buffers, and the optimizer's per-parameter
    state, to `device` in place: the optimizer keeps the same parameter objects."""
    before = [id(p) for p in module.parameters()]
    module.to(device)  # between CPU and an accelerator this keeps the Parameter objects
    if [id(p) for p in module.parameters()] != before:
        raise RuntimeError(
            f"moving {type(module).__name__} to {device} replaced its parameter objects (e.g. "
            "torch.__future__.set_overwrite_module_params_on_conversion(True), or a meta "
            "device): the optimizer would keep stepping the old ones"
        )
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and _follows_param(group, key):
                    state[key] = value.to(device)


class Offloader:
    """Moves a model to CPU between calls and back to `device` before one (see the module
    docstring). `move(device)` moves everything the model holds."""

    def __init__(
        self,
        name: str,
        device: torch.device,
        enabled: bool,
        move: Callable[[torch.device], None],
    ):
        self.name = name
        self.device = device
        self.enabled = enabled
        self.move = move
        self.offloaded = False
        self._said_nothing_moves = False

    def offload(self) -> None:
        """Move to CPU (once: offloading an offloaded model does nothing)."""
        if self.offloaded or not self._moves():
            return
        self.move(CPU)
        self.offloaded = True
        logger.debug("offloaded %s from %s", self.name, self.device)

    def onload(self) -> None:
        """Move back to `device` if offloaded."""
        if not self.offloaded:
            return
        self.move(self.device)
        self.offloaded = False
        logger.debug("onloaded %s to %s", self.name, self.device)

    def _moves(self) -> bool:
        if self.enabled and self.device.type != "cpu":
            return True
        if not self._said_nothing_moves:
            reason = f"it is on {self.device}" if self.enabled else "offload is off"
            logger.info("offload of %s: nothing to move (%s)", self.name, reason)
            self._said_nothing_moves = True
        return False
