"""Placement: the `device` key resolved once before workers start, worker i on cuda:(i % GPUs),
Ray actors asking for GPUs, and every role's parameters on its worker's device."""

import logging

import pytest
import torch

from realflow.api.config import ConfigError
from realflow.experiments.common import ExperimentConfig
from realflow.experiments.dpo import DPOConfig
from realflow.system import runner, transport
from realflow.system.devices import (
    local_worker_devices,
    process_group_backend,
    ray_gpus_per_worker,
    resolve_device,
)
from realflow.system.ray_transport import place_ray
from realflow.system.worker import Kind, WorkerSpec

NO_GPU = not torch.cuda.is_available()


def test_device_key_resolves_against_the_gpus_present():
    assert resolve_device("auto", 0) == "cpu"
    assert resolve_device("auto", 2) == "cuda"
    assert resolve_device("cpu", 8) == "cpu"
    assert resolve_device("cuda", 1) == "cuda"
    with pytest.raises(ConfigError, match="device: cuda was asked but this machine has no CUDA"):
        resolve_device("cuda", 0)


def test_local_workers_take_gpus_round_robin():
    assert local_worker_devices("cpu", 3, 0) == ["cpu"] * 3
    assert local_worker_devices("cuda", 2, 4) == ["cuda:0", "cuda:1"]
    # more workers than GPUs: they share, worker i on cuda:(i % n)
    assert local_worker_devices("cuda", 5, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


def test_ray_gpus_per_worker():
    assert ray_gpus_per_worker("cuda", -1) == 1.0
    assert ray_gpus_per_worker("cpu", -1) == 0.0
    assert ray_gpus_per_worker("cuda", 0.25) == 0.25
    with pytest.raises(ConfigError, match=r"ray_gpus_per_worker \(0.5\) must be 0 or -1"):
        ray_gpus_per_worker("cpu", 0.5)
    with pytest.raises(ConfigError, match=r"ray_gpus_per_worker \(0\) must be > 0"):
        ray_gpus_per_worker("cuda", 0)
    assert process_group_backend("cpu") == "gloo"
    assert process_group_backend("cuda:0") == "cpu:gloo,cuda:nccl"


def _specs(cfg: ExperimentConfig, n: int) -> list[WorkerSpec]:
    return [WorkerSpec(i, cfg, [f"r{i}"], [], [], i == 0, 1) for i in range(n)]


def test_ray_placement_checks_the_cluster_before_any_actor():
    cfg = ExperimentConfig(device="auto")
    specs, gpus = place_ray(_specs(cfg, 3), cluster_gpus=0)
    assert (gpus, [s.device for s in specs]) == (0.0, ["cpu"] * 3)
    specs, gpus = place_ray(_specs(cfg, 3), cluster_gpus=4)
    assert (gpus, [s.device for s in specs]) == (1.0, ["cuda"] * 3)
    with pytest.raises(ConfigError, match=r"3 workers x 1.0 GPU\(s\) \(3.0\) is more than .* 2"):
        place_ray(_specs(cfg, 3), cluster_gpus=2)
    cfg.ray_gpus_per_worker = 0.5  # fractions share: 3 x 0.5 fits on 2
    assert place_ray(_specs(cfg, 3), cluster_gpus=2)[1] == 0.5
    with pytest.raises(ConfigError, match="the Ray cluster has no CUDA GPU"):
        place_ray(_specs(ExperimentConfig(device="cuda"), 1), cluster_gpus=0)


def test_config_refuses_impossible_gpu_counts():
    assert ExperimentConfig(ray_gpus_per_worker=-2).validate() == [
        "ray_gpus_per_worker (-2) must be -1 (automatic) or >= 0"
    ]
    assert ExperimentConfig(device="cpu", ray_gpus_per_worker=1).validate() == [
        "ray_gpus_per_worker (1) must be 0 or -1 with device=cpu"
    ]
    assert (
        "must be > 0 with device=cuda"
        in ExperimentConfig(device="cuda", ray_gpus_per_worker=0).validate()[0]
    )
    assert ExperimentConfig(device="cuda", ray_gpus_per_worker=0.5).validate() == []


def _dpo(tmp_path, **changes) -> DPOConfig:
    cfg = DPOConfig(
        output_dir=str(tmp_path / "run"),
        total_steps=1,
        n_seqs=4,
        tensorboard=False,
        progress_bar=False,
        **changes,
    )
    cfg.actor.path = cfg.ref.path = "builtin:tiny"
    return cfg


@pytest.mark.skipif(not NO_GPU, reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_worker(tmp_path, monkeypatch):
    def no_worker(*args, **kwargs):
        raise AssertionError("a worker was built although the device is impossible")

    monkeypatch.setattr(transport, "ModelWorker", no_worker)
    with pytest.raises(ConfigError, match="device: cuda was asked but this machine has no CUDA"):
        runner.run("dpo", _dpo(tmp_path, device="cuda"))
    assert runner.run_experiment("dpo", _dpo(tmp_path, device="cuda", overwrite=True)) == 2


@pytest.mark.parametrize("device", ["auto", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_run_logs_the_device_of_each_role(tmp_path, caplog, device):
    """One DPO step with actor and ref on two workers; the log says where each role is (auto:
    cpu on a machine without a GPU, as in CI; worker i on cuda:(i % GPUs) on one with GPUs)."""
    with caplog.at_level(logging.INFO, logger="realflow.system"):
        cfg = _dpo(tmp_path, device=device, allocation={"actor": 0, "ref": 1})
        rows = runner.run("dpo", cfg).rows
    messages = [r.getMessage() for r in caplog.records]
    n_gpus = torch.cuda.device_count()
    want = ["cpu", "cpu"] if NO_GPU else [f"cuda:{i % n_gpus}" for i in range(2)]
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["loss"]))
    for worker, role in enumerate(("actor", "ref")):
        assert f"worker {worker} on {want[worker]}: {role}" in messages
        built = f"built {role} (builtin:tiny"
        assert any(m.startswith(built) and m.endswith(f" on {want[worker]}") for m in messages)
    # Every MFC's stats carry its peak GPU memory on a GPU, and nothing on CPU (no honest
    # per-call figure exists there).
    peaks = {k.split("/")[0]: v for k, v in rows[0].items() if k.endswith("/peak_memory_gib")}
    if NO_GPU:
        assert peaks == {}
    else:
        assert set(peaks) == {m.name for m in cfg.dfg().mfcs()}
        assert all(
            0 < v < torch.cuda.get_device_properties(0).total_memory / 2**30 for v in peaks.values()
        )


def _set_up_workers(cfg: DPOConfig) -> transport.LocalTransport:
    dfg = cfg.dfg()
    t = transport.LocalTransport()
    t.start(runner.worker_specs(cfg, dfg, runner.placement(cfg, dfg)))
    t.call_all(list(range(t.n_workers)), Kind.SETUP)
    return t


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_every_role_has_its_parameters_on_its_workers_device(tmp_path, device):
    """Roles on two workers (one per GPU when there are two, else sharing one), and two roles
    sharing a worker: every parameter of every role is on its worker's device."""
    for allocation in ({"actor": 0, "ref": 1}, {"actor": 0, "ref": 0}):
        t = _set_up_workers(_dpo(tmp_path, device=device, allocation=allocation))
        try:
            n_gpus = torch.cuda.device_count() if device == "cuda" else 0
            for i, worker in enumerate(t.workers):
                want = torch.device(f"cuda:{i % n_gpus}" if device == "cuda" else "cpu")
                assert t.devices[i] == str(want)
                for name, model in worker.models.items():
                    devices = {p.device for p in model.module.module.parameters()}
                    assert devices == {want}, (name, devices)
        finally:
            t.shutdown()
