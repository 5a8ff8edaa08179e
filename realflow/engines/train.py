"""Train and inference engines: the machinery under an interface.

A `TrainEngine` owns one optimizer step at a time: gradient accumulation over a variable number
of micro-batches with exact loss weighting, gradient clipping, the LR schedule, bf16 and the
data-parallel gradient average. What differs between backends (plain torch AdamW, deepspeed
ZeRO) lives in a small backend object it composes (`TorchBackend` here, `DeepSpeedBackend` in
`deepspeed_engine.py`); everything else is shared.

    engine = build_train_engine(module, EngineConfig(), OptimizerConfig(lr=1e-4), total_train_steps=100)
    stats = engine.train_batch(micro_batches, loss_fn, loss_weight_fn=lambda mb: mb.total_tokens("ids"))

`loss_fn(module, mb) -> (loss, stats)` computes the loss of one micro-batch as a mean over that
micro-batch (e.g. a token mean); the engine scales micro-batch i by `w_i / sum_j w_j` with
`w_i = loss_weight_fn(mb_i)`, so the accumulated gradient is the gradient of the mean over the
whole batch however it was split. With data parallelism the weights are summed over the dp group
and gradients are averaged over it, so the result is the mean over the global batch.

Engines work on any `nn.Module`. Data placement is the caller's: `loss_fn` moves the
micro-batch to `engine.device`.

Precision (see EngineConfig): a trained module's floating parameters are upcast to fp32 when the
engine is built (fp32 master weights and optimizer state, whatever dtype they arrived in), and
`save_dtype` ("auto": the dtype they arrived in) is what the weights are saved as.

Offload (`EngineConfig.offload`, torch backend): `offload()` moves weights, gradients and
optimizer state to CPU, `onload()` (or the next `train_batch` / `forward_no_grad`) brings them
back; see realflow/engines/offload.py.

Sharded models (realflow.parallel.runtime, torch backend): an engine built with `parallel` (a
`ParallelContext`) over a tensor / pipeline shard runs the 1F1B pipeline in `train_batch` when
pp > 1 (the same loss scales) and clips by the global gradient norm; `engine.parallel` is None
for a whole model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from realflow.api.data import SequenceSample
from realflow.engines.common import (
    EngineError,
    autocast,
    clone_state,
    dp_world,
    load_weights,
    module_device,
    trainable_state_dict,
    upcast_to_fp32,
)
from realflow.engines.config import EngineConfig, OptimizerConfig
from realflow.engines.offload import Offloader, move_train_state
from realflow.engines.optimizers import make_optimizer, set_lr_factor
from realflow.engines.schedule import lr_at, lr_factor

logger = logging.getLogger(__name__)

T = TypeVar("T")
LossFn = Callable[[nn.Module, SequenceSample], tuple[torch.Tensor, dict[str, float]]]
LossWeightFn = Callable[[SequenceSample], float]


def _weighted_mean(values: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """Per-key weighted mean over the micro-batches that report the key."""
    sums: dict[str, float] = {}
    norms: dict[str, float] = {}
    for stats, w in zip(values, weights):
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + w * float(v)
            norms[k] = norms.get(k, 0.0) + w
    return {k: sums[k] / norms[k] if norms[k] > 0 else math.nan for k in sums}


# ---- backends ----------------------------------------------------------------------------------


class Backend(Protocol):
    """What a TrainEngine needs from a backend."""

    module: nn.Module  # the unwrapped module
    call_module: nn.Module  # what loss_fn and forward_no_grad receive (may wrap `module`)
    device: torch.device
    collective_backward: bool  # whether each backward communicates over the dp group
    # Whether state_dict() holds the fp32 master weights (deepspeed's ZeRO and bf16 optimizers);
    # otherwise the module's own parameters are the masters.
    masters_in_state: bool

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr_factor: float) -> float:
        """Apply the accumulated gradients with every param group at its peak LR times
        `lr_factor`, zero them, return the pre-clip grad norm."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 master weights by module state-dict name (gathered under ZeRO-3)."""
        ...

    def load_module_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Set the master weights (backends with `masters_in_state` False): all of them, or
        only the trainable ones of a module with frozen parameters."""
        ...

    def move(self, device: torch.device) -> None:
        """Move weights, gradients and optimizer state to `device` (offload)."""
        ...


class TorchBackend:
    """Plain torch: the configured optimizer (AdamW by default), `clip_grad_norm_`, bf16
    autocast, a manual dp gradient average."""

    name = "torch"
    collective_backward = False  # gradients are averaged once, in step()
    masters_in_state = False

    def __init__(
        self,
        module: nn.Module,
        engine_cfg: EngineConfig,
        optim_cfg: OptimizerConfig,
        dp_group: Any = None,
        parallel: Any = None,
    ):
        self.module = self.call_module = module
        self.device = module_device(module)
        self.bf16 = engine_cfg.bf16
        self.clip = optim_cfg.gradient_clipping
        self.dp_group = dp_group
        self.parallel = parallel  # realflow.parallel.runtime.ParallelContext, or None
        self.optimizer = make_optimizer(module, optim_cfg)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.bf16)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr_factor: float) -> float:
        self._average_gradients()
        set_lr_factor(self.optimizer, lr_factor)
        max_norm = self.clip if self.clip > 0 else math.inf
        if self.parallel is not None and self.parallel.sharded:
            grad_norm = self.parallel.clip_grad_norm_(max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _average_gradients(self) -> None:
        active, size = dp_world(self.dp_group)
        if not active:
            return
        grads = []
        for p in self.params:
            if p.grad is None:  # every rank must reduce the same tensors
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dp_group)
        flat.div_(size)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_module_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        load_weights(self.module, weights)  # copies in place: the optimizer keeps its params

    def move(self, device: torch.device) -> None:
        move_train_state(self.module, self.optimizer, device)


# ---- engines -----------------------------------------------------------------------------------


class TrainEngine:
    """One model being trained: `train_batch` is one optimizer step. See the module docstring."""

    def __init__(
        self,
        backend: Backend,
        engine_cfg: EngineConfig,
        optim_cfg: OptimizerConfig,
        total_train_steps: int,
        dp_group: Any = None,
        loaded_dtype: torch.dtype = torch.float32,
        parallel: Any = None,
    ):
        self.backend = backend
        self.parallel = parallel  # realflow.parallel.runtime.ParallelContext, or None
        self.engine_cfg = engine_cfg
        self.optim_cfg = optim_cfg
        self.total_train_steps = total_train_steps
        self.dp_group = dp_group
        self.loaded_dtype = loaded_dtype  # the dtype the weights arrived in
        self.step = 0
        self._offloader = Offloader(
            type(backend.module).__name__, backend.device, engine_cfg.offload, backend.move
        )

    @property
    def module(self) -> nn.Module:
        """The unwrapped module (for saving and generation)."""
        return self.backend.module

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def save_dtype(self) -> torch.dtype:
        """The dtype to save the weights in: `engine_cfg.save_dtype`, "auto" being the dtype
        the weights arrived in."""
        name = self.engine_cfg.save_dtype
        return self.loaded_dtype if name == "auto" else getattr(torch, name)

    @property
    def frozen(self) -> bool:
        """Whether part of the module is frozen (adapters: only they are trained)."""
        return any(not p.requires_grad for p in self.module.parameters())

    @property
    def _state_holds_weights(self) -> bool:
        """Whether state_dict() must carry the masters: the saved weights cannot restore them
        (a lower save dtype, or adapters, whose role is rebuilt from its base checkpoint)."""
        if self.backend.masters_in_state:
            return False
        return self.save_dtype != torch.float32 or self.frozen

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step will use."""
        return lr_at(self.optim_cfg, self.step, self.total_train_steps)

    def train_batch(
        self,
        micro_batches: list[SequenceSample],
        loss_fn: LossFn,
        loss_weight_fn: LossWeightFn,
    ) -> dict[str, float]:
        """One optimizer step over `micro_batches` (gradient accumulation, clipping, LR step).

        Returns `loss` (the weighted mean of the micro-batch losses), `grad_norm` (before
        clipping), `lr` (used by this step), and every stat of `loss_fn` averaged with the same
        weights. With a dp group, losses and stats are those means over the whole group's
        micro-batches (the same on every rank), as gradients are averaged over it.
        """
        if not micro_batches:
            raise EngineError("train_batch needs at least one micro-batch, got none")
        weights = [float(loss_weight_fn(mb)) for mb in micro_batches]
        if any(w < 0 or not math.isfinite(w) for w in weights):
            raise EngineError(f"loss weights must be finite and >= 0, got {weights}")
        total, dp_size, n_passes = self._dp_sync(sum(weights), len(micro_batches))
        if total <= 0:
            raise EngineError(f"loss weights sum to {total} over the dp group; need > 0")
        self._offloader.onload()
        self.module.train()
        scales = [w * dp_size / total for w in weights]
        if self.parallel is not None and self.parallel.pipelined:
            with self.backend.autocast():
                results = self.parallel.forward_backward(micro_batches, loss_fn, scales)
        else:
            results = self._accumulate(micro_batches, loss_fn, scales, n_passes)
        losses = [{"loss": loss} for loss, _ in results]
        all_stats = [stats for _, stats in results]
        lr = self.lr
        grad_norm = self.backend.step(lr_factor(self.optim_cfg, self.step, self.total_train_steps))
        self.step += 1
        out = _weighted_mean(all_stats, weights)
        out.update(_weighted_mean(losses, weights))
        out = self._dp_mean(out, sum(weights))
        out.update(grad_norm=grad_norm, lr=lr)
        return out

    def _dp_mean(self, stats: dict[str, float], weight: float) -> dict[str, float]:
        """This rank's loss-weighted means `stats` (over weight `weight`) as the means over the
        whole dp group, weighted by each rank's weight (a key some ranks lack is averaged over
        those that report it). One object all-gather: keys may differ between ranks."""
        active, size = dp_world(self.dp_group)
        if not active:
            return stats
        every: list[Any] = [None] * size
        dist.all_gather_object(every, (weight, stats), group=self.dp_group)
        return _weighted_mean([s for _, s in every], [w for w, _ in every])

    def _accumulate(
        self, micro_batches: list[SequenceSample], loss_fn: LossFn, scales: list[float], n: int
    ) -> list[tuple[float, dict[str, float]]]:
        """Forward and backward of each micro-batch, its loss scaled by `scales[i]`;
        `(loss_i, stats_i)` per micro-batch. Passes beyond the micro-batches (n > their number,
        see _dp_sync) repeat the last one with scale 0."""
        results = []
        for i in range(n):
            mb, scale = (
                (micro_batches[i], scales[i]) if i < len(scales) else (micro_batches[-1], 0.0)
            )
            with self.backend.autocast():
                loss, stats = loss_fn(self.backend.call_module, mb)
            self.backend.backward(loss * scale)
            if i < len(scales):
                results.append((float(loss.detach()), stats))
        return results

    def _dp_sync(self, local_weight: float, n_micro_batches: int) -> tuple[float, int, int]:
        """(sum of loss weights over the dp group, dp size, backward passes to run here).

        When every backward is a collective (deepspeed ZeRO-2/3 reduce gradients per backward),
        all dp ranks must run the same number of backward passes: the max over the group.
        """
        active, size = dp_world(self.dp_group)
        if not active:
            return local_weight, 1, n_micro_batches
        device = self.device if dist.get_backend(self.dp_group) == "nccl" else "cpu"
        total = torch.tensor([local_weight], dtype=torch.float64, device=device)
        dist.all_reduce(total, group=self.dp_group)
        n_passes = n_micro_batches
        if self.backend.collective_backward:
            count = torch.tensor([n_micro_batches], dtype=torch.int64, device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.dp_group)
            n_passes = int(count.item())
        return float(total.item()), size, n_passes

    def forward_no_grad(self, fn: Callable[[nn.Module], T]) -> T:
        """`fn(module)` in eval mode, without grad, under bf16 autocast when enabled."""
        self._offloader.onload()
        with _eval_mode(self.module), torch.no_grad(), self.backend.autocast():
            return fn(self.backend.call_module)

    def forward_generate(self, fn: Callable[[nn.Module], T]) -> T:
        """`fn(module)` for generation: `forward_no_grad` on the unwrapped module, whose adapters
        (if any) are merged into a temporary copy of the weights when `generate_merged`."""
        if not (self.engine_cfg.generate_merged and _has_adapters(self.module)):
            return self.forward_no_grad(lambda _m: fn(self.module))
        from realflow.engines.tuners import merged_adapters

        def run(_m: nn.Module) -> T:
            with merged_adapters(self.module) as merged:
                return fn(merged)

        return self.forward_no_grad(run)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state, LR schedule position and step counter, for exact resume.

        Save `module_state_dict()` (in `save_dtype`) separately and load it into the module
        *before* building the engine that resumes. When `save_dtype` cannot hold the fp32
        master weights and the optimizer state does not hold them either, they are included
        here under "weights". The returned tensors are copies. With deepspeed ZeRO and a dp
        group of several ranks, this is this rank's partition.
        """
        state = {
            "backend": self.engine_cfg.backend,
            "step": self.step,
            "total_train_steps": self.total_train_steps,
            "backend_state": self.backend.state_dict(),
        }
        if self._state_holds_weights:
            full = self.module_state_dict()
            state["weights"] = trainable_state_dict(self.module, full) if self.frozen else full
        return clone_state(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (from an engine with the same config)."""
        if state["backend"] != self.engine_cfg.backend:
            raise EngineError(
                f"state dict of backend {state['backend']!r} cannot load into backend "
                f"{self.engine_cfg.backend!r}"
            )
        if state["total_train_steps"] != self.total_train_steps:
            logger.warning(
                "resuming with total_train_steps %d (saved with %d): the LR schedule changes",
                self.total_train_steps,
                state["total_train_steps"],
            )
        if "weights" in state:
            self.backend.load_module_state_dict(state["weights"])
        self.backend.load_state_dict(clone_state(state["backend_state"]))
        self.step = int(state["step"])

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 master weights of the module (gathered under ZeRO-3), for saving: cast
        them to `save_dtype`."""
        return self.backend.module_state_dict()

    @property
    def offloaded(self) -> bool:
        return self._offloader.offloaded

    def offload(self) -> None:
        """With `engine_cfg.offload`, move the weights, gradients and optimizer state to CPU
        until the next call (torch backend; on CPU nothing moves, which is logged once)."""
        self._offloader.offload()

    def onload(self) -> None:
        """Move what `offload` moved back to `device` (`train_batch` and `forward_no_grad` do
        it themselves)."""
        self._offloader.onload()


class InferenceEngine:
    """A model that is never trained: `forward_no_grad`, and offload of idle weights to CPU
    between calls when `engine_cfg.offload` is set and the module is on an accelerator."""

    def __init__(self, module: nn.Module, engine_cfg: EngineConfig, parallel: Any = None):
        problems = engine_cfg.validate()
        if problems:
            raise EngineError("invalid engine config: " + "; ".join(problems))
        self.module = module
        self.parallel = parallel  # realflow.parallel.runtime.ParallelContext, or None
        self.engine_cfg = engine_cfg
        self.device = module_device(module)
        self._offloader = Offloader(
            type(module).__name__,
            self.device,
            engine_cfg.offload,
            lambda device: move_train_state(module, None, device),
        )

    @property
    def offloaded(self) -> bool:
        return self._offloader.offloaded

    def forward_no_grad(self, fn: Callable[[nn.Module], T]) -> T:
        """`fn(module)` in eval mode, without grad, under bf16 autocast when enabled."""
        self._offloader.onload()
        with _eval_mode(self.module), torch.no_grad():
            with autocast(self.device, self.engine_cfg.bf16):
                return fn(self.module)

    def forward_generate(self, fn: Callable[[nn.Module], T]) -> T:
        """`fn(module)` for generation (the same as `forward_no_grad` here)."""
        return self.forward_no_grad(fn)

    def offload(self) -> None:
        """Move the weights to CPU until the next call (on CPU nothing moves: logged once)."""
        self._offloader.offload()

    def onload(self) -> None:
        """Move offloaded weights back to the module's device."""
        self._offloader.onload()


def _has_adapters(module: nn.Module) -> bool:
    return hasattr(module, "peft_config")  # realflow.engines.tuners.has_adapters, no import


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def build_train_engine(
    module: nn.Module,
    engine_cfg: EngineConfig,
    optim_cfg: OptimizerConfig,
    total_train_steps: int,
    dp_group: Any = None,
    parallel: Any = None,
) -> TrainEngine:
    """Build the engine of a trained model.

    `module` holds the initial (or resumed) weights, in any one dtype: they become fp32 masters
    (see the module docstring) and `save_dtype="auto"` saves them back in it. `dp_group` is the
    torch.distributed group of the ranks that hold replicas of this model (None: the world, when
    torch.distributed is initialised; no data parallelism otherwise). `parallel` is the
    `ParallelContext` of a model shard (realflow.parallel.runtime; torch backend only).
    """
    problems = [*engine_cfg.validate(), *engine_cfg.train_problems(), *optim_cfg.validate()]
    if total_train_steps <= 0:
        problems.append(f"total_train_steps ({total_train_steps}) must be positive")
    if parallel is not None and engine_cfg.backend != "torch":
        problems.append(f"a sharded model needs backend 'torch', got {engine_cfg.backend!r}")
    if problems:
        raise EngineError("invalid engine config: " + "; ".join(problems))
    n_params = sum(p.numel() for p in module.parameters())
    loaded_dtype = upcast_to_fp32(module)
    backend: Backend
    if engine_cfg.backend == "torch":
        backend = TorchBackend(module, engine_cfg, optim_cfg, dp_group, parallel)
    else:
        from realflow.engines.deepspeed_engine import DeepSpeedBackend

        backend = DeepSpeedBackend(module, engine_cfg, optim_cfg, dp_group)
    logger.info(
        "built %s train engine for %s (%d parameters)",
        engine_cfg.backend,
        type(module).__name__,
        n_params,
    )
    return TrainEngine(
        backend, engine_cfg, optim_cfg, total_train_steps, dp_group, loaded_dtype, parallel
    )
