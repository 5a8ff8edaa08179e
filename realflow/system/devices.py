"""Which device each worker owns, decided once before any worker starts.

`device` (an ExperimentConfig key) is `auto`, `cpu` or `cuda`; `auto` means cuda when the
machine (mode=local) or the Ray cluster (mode=ray) has GPUs. Asking for cuda where there is none
is a ConfigError, raised before a worker starts.

- mode=local: worker i owns `cuda:{i % n_gpus}`; roles on one worker share its GPU, and workers
  beyond the GPU count share GPUs round-robin (logged).
- mode=ray: each worker actor asks Ray for `ray_gpus_per_worker` GPUs (-1: 1 with cuda, 0 on
  CPU; fractions let actors share a GPU) and uses the one Ray assigned it (`cuda:0` inside the
  actor, whose CUDA_VISIBLE_DEVICES Ray sets).

On a CPU-only machine every worker owns `cpu`, as before this module existed.
"""

from __future__ import annotations

import logging

import torch

from realflow.api.config import ConfigError

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
AUTO_GPUS = -1.0  # ray_gpus_per_worker: 1 per worker with cuda, 0 on CPU


def resolve_device(choice: str, n_gpus: int, where: str = "this machine") -> str:
    """`cpu` or `cuda` for the `device` key given the GPUs present (`where` names them)."""
    if choice not in DEVICE_CHOICES:
        raise ConfigError([f"device: {choice!r} is not one of {', '.join(DEVICE_CHOICES)}"])
    if choice == "cuda" and n_gpus == 0:
        raise ConfigError(
            [
                f"device: cuda was asked but {where} has no CUDA GPU "
                f"(torch {torch.__version__}, cuda build {torch.version.cuda}); "
                "use device=cpu or device=auto, or run on a machine with a GPU"
            ]
        )
    if choice == "auto":
        return "cuda" if n_gpus > 0 else "cpu"
    return choice


def local_gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_worker_devices(kind: str, n_workers: int, n_gpus: int) -> list[str]:
    """The device of each worker of mode=local: `cpu`, or `cuda:{i % n_gpus}` for worker i."""
    if kind == "cpu":
        return ["cpu"] * n_workers
    assert kind == "cuda" and n_gpus > 0, (kind, n_gpus)
    if n_workers > n_gpus:
        logger.info(
            "%d workers on %d GPU(s): worker i uses cuda:(i %% %d), so some share a GPU",
            n_workers,
            n_gpus,
            n_gpus,
        )
    return [f"cuda:{i % n_gpus}" for i in range(n_workers)]


def ray_gpus_per_worker(kind: str, asked: float) -> float:
    """The `num_gpus` of each Ray worker actor for device `kind` and `ray_gpus_per_worker`."""
    if asked == AUTO_GPUS:
        return 1.0 if kind == "cuda" else 0.0
    if kind == "cpu" and asked > 0:
        raise ConfigError(
            [f"ray_gpus_per_worker ({asked}) must be 0 or -1 with device=cpu; set device=cuda"]
        )
    if kind == "cuda" and asked <= 0:
        raise ConfigError(
            [
                f"ray_gpus_per_worker ({asked}) must be > 0 with device=cuda (a worker with no "
                "GPU cannot own one); use -1 for one GPU per worker, or a fraction to share"
            ]
        )
    return asked


def process_group_backend(device: str) -> str:
    """torch.distributed backend of the workers' group: NCCL for CUDA tensors, gloo for CPU
    tensors (always there, for CPU-side data and metadata)."""
    return "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"


def reset_peak_memory(device: torch.device | str) -> None:
    """Start measuring the peak memory of one call on `device` (CUDA only; see
    `peak_memory_stats`)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_stats(device: torch.device | str) -> dict[str, float]:
    """`{"peak_memory_gib": ...}`: the most memory allocated on a CUDA `device` since
    `reset_peak_memory` (torch.cuda.max_memory_allocated; calls running at the same time on one
    GPU share it). Empty on CPU: the process's peak RSS never resets, so no per-call figure
    would be honest."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
