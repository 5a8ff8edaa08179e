"""bf16 by default on a GPU: what each role computes in and holds its weights in, per device
(decided from the device alone, so it is checked here without one)."""

from __future__ import annotations

import pytest
import torch

from realflow.experiments.common import ModelConfig, ModelRole
from realflow.system.devices import peak_memory_stats
from realflow.system.models import weights_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "bf16, device, compute_bf16",
    [(None, CUDA, True), (None, CPU, False), (False, CUDA, False), (True, CPU, True)],
)
def test_bf16_unset_means_bf16_on_a_gpu_only(bf16, device, compute_bf16):
    cfg = ModelConfig(bf16=bf16)
    assert cfg.engine_config(device.type).bf16 is compute_bf16


@pytest.mark.parametrize(
    "bf16, device, trained, expected",
    [
        (None, CUDA, True, None),  # trained: the checkpoint's dtype, upcast to fp32 masters
        (None, CUDA, False, torch.bfloat16),  # inference only on a GPU: 2 bytes per parameter
        (True, CUDA, False, torch.bfloat16),
        (False, CUDA, False, torch.float32),  # fp32 compute: computes what a trained role does
        (None, CPU, False, torch.float32),  # CPU as before: no bf16 unless asked
        (True, CPU, False, None),  # bf16 asked on CPU: the checkpoint's dtype, as before
    ],
)
def test_role_weights_dtype_per_device(bf16, device, trained, expected):
    role = ModelRole(ModelConfig(bf16=bf16), "lm")
    assert weights_dtype(role, trained, device) == expected


def test_no_peak_memory_figure_on_cpu():
    assert peak_memory_stats("cpu") == {}


@pytest.mark.cuda
def test_peak_memory_is_the_calls_own_peak():
    from realflow.system.devices import reset_peak_memory

    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB, freed before the call
    del x
    reset_peak_memory("cuda")
    base = torch.cuda.memory_allocated() / 2**30  # what earlier tests still hold
    y = torch.empty(2**26, dtype=torch.uint8, device="cuda")  # 64 MiB during the call
    peak = peak_memory_stats("cuda")["peak_memory_gib"] - base
    assert 64 / 1024 <= peak < 256 / 1024
    del y
