"""The deepspeed backend of TrainEngine: ZeRO stages 0-3 with a torch client optimizer
(AdamW by default; see realflow/engines/optimizers.py).

Imported only when `EngineConfig.backend == "deepspeed"`; `import realflow.engines` never
imports deepspeed.

Gradient accumulation over a VARIABLE number of micro-batches per step. deepspeed's default
("managed") accumulation counts micro-steps against a fixed `gradient_accumulation_steps` and
divides every loss by it. We instead set `gradient_accumulation_steps=1` and
`managed_gradient_accumulation=false` (deepspeed >= 0.19): `engine.backward()` then only
accumulates gradients (ZeRO-2/3 reduce-scatter them per backward into the partitioned buffers,
ZeRO-0/1 reduce at the step), and each `engine.step()` is the accumulation boundary that
finalises the gradients, clips, and applies the update. The caller (TrainEngine) scales
micro-batch i's loss by `w_i / sum_j w_j` itself, so any number of micro-batches gives the exact
gradient of the batch mean. ZeRO `overlap_comm` is only allowed with stage 2 in that mode; it is
enabled there on CUDA and off elsewhere.

LR schedule: no deepspeed scheduler. TrainEngine computes the LR of each step from the pure
schedule (realflow.engines.schedule) and the backend writes it into the param groups of
deepspeed's optimizer (which are the client AdamW's groups) right before `engine.step()`.

Data-parallel group. deepspeed takes its data-parallel group from an `mpu` object (Megatron's
"model parallel unit": `get_{data,model}_parallel_{group,rank,world_size}()`). We pass
`_DataParallelMPU(dp_group)`: data parallel = `dp_group` (the world when None), model/tensor/
pipeline parallel = a one-rank group of this rank (created with local synchronisation, so ranks
outside the model are never involved). deepspeed stores the groups it needs (ZeRO partition
group, grad-norm group) in the engine and optimizer at initialise time. Without an mpu deepspeed
would clone the world group, a collective over every rank of the world, which would hang a
runtime whose models live on subsets of the ranks. Caveats:
- ZeRO-0/1/2 work on any subgroup (tested with a 3-rank world and a model on 2 ranks). ZeRO-3
  does not in deepspeed 0.19: it runs world-wide barriers while partitioning and rank-0
  broadcasts checking the module trace on the first steps, so stage 3 requires `dp_group` to
  span the world (an EngineError says so otherwise).
- ZeRO-2/3 reduce-scatter in every backward, so all dp ranks must run the same number of
  backward passes: TrainEngine all-reduces the max micro-batch count and ranks with fewer
  micro-batches repeat their last one with loss weight 0 (`collective_backward` below).
- deepspeed also keeps the last `mpu` in a process-global (`deepspeed.utils.groups.mpu`) read by
  a few helpers (its own checkpointing, MoE, sequence parallel) that realflow does not use;
  several engines with different dp groups in one process are fine for what realflow calls.

Precision. TrainEngine hands over fp32 weights. With bf16, deepspeed casts the module to bf16
and builds its fp32 master copies from those bf16 values, which would round the masters of an
fp32 checkpoint: the exact fp32 values are written back into the masters right after
initialisation. `module_state_dict()` returns the fp32 masters (gathered under ZeRO-3), never
the bf16 copies or ZeRO-3's empty partitions.

If torch.distributed is not initialised, a single-process world is created (gloo on CPU, nccl
on CUDA) from MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK, which default to a free
local port and rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from realflow.engines.common import EngineError, load_weights
from realflow.engines.config import EngineConfig, OptimizerConfig
from realflow.engines.optimizers import make_optimizer, set_lr_factor

logger = logging.getLogger(__name__)

# (world group, this rank's one-rank group): recreated when the world is re-initialised.
_SELF_GROUP: tuple[Any, Any] | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_process_group() -> bool:
    """Initialise torch.distributed as a single-process world if it is not yet initialised
    (env defaults: MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK=0, WORLD_SIZE=1,
    LOCAL_RANK=0). Returns True when this call created the process group."""
    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, default)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    logger.info(
        "initialised torch.distributed (%s, rank %s of %s, %s:%s)",
        backend,
        os.environ["RANK"],
        os.environ["WORLD_SIZE"],
        os.environ["MASTER_ADDR"],
        os.environ["MASTER_PORT"],
    )
    return True


def _self_group() -> Any:
    """A process group holding only this rank (cached per world)."""
    global _SELF_GROUP
    world = dist.group.WORLD
    if _SELF_GROUP is None or _SELF_GROUP[0] is not world:
        group = dist.new_group([dist.get_rank()], use_local_synchronization=True)
        _SELF_GROUP = (world, group)
    return _SELF_GROUP[1]


class _DataParallelMPU:
    """The `mpu` deepspeed reads its parallel groups from: data parallel over `dp_group`, no
    tensor or pipeline parallelism (one-rank groups)."""

    def __init__(self, dp_group: Any = None):
        self.dp_group = dp_group if dp_group is not None else dist.group.WORLD
        self.self_group = _self_group()

    def get_data_parallel_group(self) -> Any:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.dp_group)

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(group=self.dp_group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dp_group)

    def get_model_parallel_group(self) -> Any:
        return self.self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = get_model_parallel_rank


def deepspeed_config(engine_cfg: EngineConfig, optim_cfg: OptimizerConfig) -> dict[str, Any]:
    """The deepspeed config dict for these dataclasses (see the module docstring)."""
    stage = engine_cfg.zero_stage
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": optim_cfg.gradient_clipping,
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": stage == 2 and torch.cuda.is_available(),
            "contiguous_gradients": True,
        },
        "bf16": {"enabled": engine_cfg.bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedBackend:
    """deepspeed.initialize around `module` with a torch client optimizer."""

    name = "deepspeed"

    def __init__(
        self,
        module: nn.Module,
        engine_cfg: EngineConfig,
        optim_cfg: OptimizerConfig,
        dp_group: Any = None,
    ):
        import deepspeed

        ensure_process_group()
        self.stage = engine_cfg.zero_stage
        # ZeRO-2/3 reduce-scatter gradients in every backward; ZeRO-0/1 reduce once in step().
        self.collective_backward = self.stage >= 2
        self.clip = optim_cfg.gradient_clipping
        self.bf16 = engine_cfg.bf16
        self._grad_norm: float | None = None
        config = deepspeed_config(engine_cfg, optim_cfg)
        client_optimizer = make_optimizer(module, optim_cfg)
        if self.stage == 0 and not engine_cfg.bf16:
            # deepspeed then steps the client optimizer directly and keeps no grad norm: clip in
            # a pre-step hook instead, which runs after deepspeed's dp all-reduce.
            config["gradient_clipping"] = 0.0
            client_optimizer.register_step_pre_hook(self._clip_hook)
        mpu = _DataParallelMPU(dp_group)
        if self.stage == 3 and mpu.get_data_parallel_world_size() != dist.get_world_size():
            raise EngineError(
                f"deepspeed ZeRO-3 needs a dp group spanning the whole world "
                f"({dist.get_world_size()} ranks), got {mpu.get_data_parallel_world_size()} ranks: "
                "deepspeed 0.19 runs world-wide barriers and rank-0 broadcasts in ZeRO-3; "
                "use zero_stage 0, 1 or 2 for models on a subset of the ranks"
            )
        # fp32 values that bf16 cannot hold, to restore in the masters after the bf16 cast.
        exact = _not_bf16_exact(module) if self.bf16 else {}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=client_optimizer,
            config=config,
            mpu=mpu,
            dist_init_required=False,
        )
        self.module = self.engine.module
        self.call_module = self.engine
        self.device = self.engine.device
        self._find_masters()
        params = dict(self.module.named_parameters())
        for name, value in exact.items():
            self._set_master(params[name], value.to(self.device))

    def _find_masters(self) -> None:
        """Where the fp32 master weights live. ZeRO-1/2/3, and stage 0 with bf16 (deepspeed's
        unfused optimizer), keep them in the optimizer and its state; stage 0 in fp32 steps the
        module's own parameters."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer  # BF16_Optimizer included
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        self._zero = isinstance(self.optimizer, ZeROOptimizer)
        unfused = isinstance(self.optimizer, FP16_UnfusedOptimizer)
        self.masters_in_state = self._zero or unfused
        self._unfused_masters: dict[int, torch.Tensor] = {}  # id(param) -> its fp32 master
        if unfused:
            for lows, highs in zip(self.optimizer.fp16_groups, self.optimizer.fp32_groups):
                self._unfused_masters.update((id(lp), hp) for lp, hp in zip(lows, highs))

    def _clip_hook(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        max_norm = self.clip if self.clip > 0 else math.inf
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def autocast(self) -> contextlib.AbstractContextManager:
        # bf16 under deepspeed means bf16 weights with fp32 master copies, not autocast.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr_factor: float) -> float:
        set_lr_factor(self.optimizer, lr_factor)
        self._grad_norm = None
        self.engine.step()
        norm = (
            self._grad_norm if self._grad_norm is not None else self.engine.get_global_grad_norm()
        )
        if norm is None:
            raise EngineError("deepspeed did not report a gradient norm")
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        return {
            "zero_stage": self.stage,
            "optimizer": self.optimizer.state_dict(),
            "global_steps": self.engine.global_steps,
            "global_samples": self.engine.global_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["zero_stage"] != self.stage:
            raise EngineError(
                f"optimizer state of ZeRO stage {state['zero_stage']} cannot load into stage "
                f"{self.stage}"
            )
        if self._zero:
            # fp32 master weights come from the saved state, not the (maybe bf16) module.
            self.optimizer.load_state_dict(
                [state["optimizer"]], load_optimizer_states=True, load_from_fp32_weights=True
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.engine.global_steps = state["global_steps"]
        self.engine.global_samples = state["global_samples"]

    def _master(self, p: nn.Parameter) -> torch.Tensor | None:
        """The fp32 master of a trainable parameter (full, gathered), or None when the
        parameter is its own master."""
        from deepspeed.utils import safe_get_full_fp32_param

        if id(p) in self._unfused_masters:
            return self._unfused_masters[id(p)]
        return safe_get_full_fp32_param(p)

    def _set_master(self, p: nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        if id(p) in self._unfused_masters:
            self._unfused_masters[id(p)].data.copy_(value.reshape(p.shape))
        else:
            safe_set_full_fp32_param(p, value)

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights: gathered under ZeRO-3, the fp32 masters (not the bf16 copies)
        under bf16."""
        params = list(self.module.parameters())
        with _gathered(params) if self.stage == 3 else contextlib.nullcontext():
            sd = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        if self.bf16:  # frozen parameters have no master: their bf16 values, upcast
            for name, p in self.module.named_parameters(remove_duplicate=False):
                master = self._master(p) if p.requires_grad else None
                value = sd[name] if master is None else master.detach().clone()
                sd[name] = value.float().reshape(sd[name].shape)
        empty = {k: tuple(v.shape) for k, v in sd.items() if v.numel() == 0}
        if empty:
            raise EngineError(f"deepspeed returned empty (partitioned) weights: {empty}")
        return sd

    def move(self, device: torch.device) -> None:
        raise EngineError(
            "offload is not supported with the deepspeed backend (EngineConfig.train_problems)"
        )

    def load_module_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        if self.masters_in_state:
            raise EngineError("deepspeed's optimizer state holds the master weights")
        load_weights(self.module, weights)


def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """ZeRO-3: the full parameters inside the context (read-only)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _not_bf16_exact(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters whose values bf16 rounds."""
    return {
        name: p.detach().clone()
        for name, p in module.named_parameters()
        if p.requires_grad
        and p.is_floating_point()
        and not torch.equal(p.detach().to(torch.bfloat16).to(p.dtype), p.detach())
    }
