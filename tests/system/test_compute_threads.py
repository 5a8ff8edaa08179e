"""LocalTransport's compute threads: where model calls run and with how many intra-op threads,
so that all workers together never use more threads than torch.get_num_threads()."""

from __future__ import annotations

import threading

import pytest
import torch

from realflow.system.transport import ComputeThreads


def _where(compute: ComputeThreads, worker: int) -> tuple[str, int]:
    return compute.runner(worker)(
        lambda: (threading.current_thread().name, torch.get_num_threads())
    )


@pytest.fixture
def cores():
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    yield 8
    torch.set_num_threads(before)


def test_serial_runs_every_worker_on_one_thread_with_all_cores(cores):
    compute = ComputeThreads("serial", [True, True, False])
    try:
        seen = {_where(compute, w) for w in range(3)}
        assert len(seen) == 1 and next(iter(seen))[1] == cores
        assert next(iter(seen))[0] != threading.current_thread().name
    finally:
        compute.shutdown(5.0)
    assert not any(t.is_alive() for t in compute.threads)


def test_partition_splits_the_cores_between_workers_with_weights(cores):
    compute = ComputeThreads("partition", [True, True, False])
    try:
        (a, na), (b, nb) = _where(compute, 0), _where(compute, 1)
        assert a != b and na + nb <= cores and na == nb == cores // 2
        assert _where(compute, 2)[1] == 1  # a weightless worker only sets up and saves
    finally:
        compute.shutdown(5.0)


def test_auto_partitions_only_when_each_worker_gets_4_threads(cores):
    for weights, plan in (([True, True], "partition"), ([True, True, True], "serial")):
        compute = ComputeThreads("auto", weights)
        compute.shutdown(5.0)
        assert compute.plan == plan


def test_errors_raised_on_a_compute_thread_reach_the_caller(cores):
    compute = ComputeThreads("serial", [True])
    try:
        with pytest.raises(ZeroDivisionError):
            compute.runner(0)(lambda: 1 / 0)
        assert _where(compute, 0)[1] == cores  # the thread survives
    finally:
        compute.shutdown(5.0)


def test_unknown_plan_is_an_error():
    with pytest.raises(ValueError, match="compute plan 'fast' unknown"):
        ComputeThreads("fast", [True])
