"""Every scheduling rule of the master, each with a test that a weakened master fails.

Each test runs a toy graph built so that breaking its rule changes something observable: the
parameter version a call read (recorded by the worker in trace.json), the calls a transport sees
outstanding on one worker, when a checkpoint was written (the master's track in trace.json),
or what a worker's store holds. Every test is parametrised with the real `Master` and with a
master that weakens exactly that rule: the check passes with the first and must fail with the
second (so a test that cannot fail is itself a failure).
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
from systest_utils import (
    EPS_US,
    Spy,
    by_key,
    check_dependencies,
    load_saves,
    load_trace,
    toy_config,
)

from realflow.api.dfg import MFCDef
from realflow.system import runner
from realflow.system.master import Master, RunFailure, StepState
from realflow.system.toy_interfaces import ToyNode, ppo_like_nodes
from realflow.system.worker import Kind

pytestmark = pytest.mark.timeout(90)


# ---- masters that each break one rule -----------------------------------------------------------


class NoInputWait(Master):
    """Data readiness broken: an MFC is ready once any one of its inputs exists."""

    def _new_step(self, step: int) -> StepState:
        state = super()._new_step(step)
        state.missing = {n: min(k, 1) for n, k in state.missing.items()}
        state.ready = {n for n, k in state.missing.items() if k == 0}
        return state


class NoPreviousTrainWait(Master):
    """Version rule 1 broken: a call on M at step t does not wait for M's train_step at t-1."""

    def _version_allows(self, mfc: MFCDef, state: StepState) -> bool:
        if mfc.is_train:
            return super()._version_allows(mfc, state)
        return True


class TrainWaitsOnlyForRunning(Master):
    """Version rule 2 weakened: train_step of M waits only for M's calls already running."""

    def _version_allows(self, mfc: MFCDef, state: StepState) -> bool:
        prev = self.steps.get(state.step - 1)
        if prev is not None and self.trainer_of.get(mfc.model_name) not in prev.done:
            return False
        if mfc.is_train:
            return not any(n in state.running for n in self.calls_on_model[mfc.model_name])
        return True


class NoIdleCheck(Master):
    """Worker exclusivity broken: calls go to a worker that is still busy."""

    def _idle(self, worker: int) -> bool:
        return True


class NoCheckpointBarrier(Master):
    """Checkpoint barrier broken: the next step starts before the due checkpoint is written."""

    def _may_fetch(self, step: int, barrier: int | None) -> bool:
        return super()._may_fetch(step, None)

    def _dispatch_ready(self, barrier: int | None) -> None:
        super()._dispatch_ready(None)


class FetchesPastTheCheckpoint(Master):
    """Checkpoint barrier broken for the loader only: the batch of a later step is fetched
    before the due checkpoint is written (its calls still wait)."""

    def _may_fetch(self, step: int, barrier: int | None) -> bool:
        return super()._may_fetch(step, None)


class ThreeStepsInFlight(Master):
    """The in-flight bound loosened by one: k+3 steps instead of k+2."""

    def _may_fetch(self, step: int, barrier: int | None) -> bool:
        self.max_staleness += 1
        try:
            return super()._may_fetch(step, barrier)
        finally:
            self.max_staleness -= 1


class FreesOnlyAtStepEnd(Master):
    """Frees broken (late): inputs are kept until their step ends, not freed after their last
    consumer."""

    def _release_inputs(self, state: StepState, mfc: MFCDef) -> None:
        pass


class FreesAfterFirstConsumer(Master):
    """Frees broken (early): an input is freed after its first consumer, not its last."""

    def _release_inputs(self, state: StepState, mfc: MFCDef) -> None:
        self._free(state, [k for k in mfc.input_keys if k in state.holders])


def _run(tmp_path: Any, monkeypatch: Any, master: type[Master], nodes: list[ToyNode], **kw: Any):
    monkeypatch.setattr(runner, "Master", master)
    cfg = toy_config(tmp_path, nodes, **kw)
    runner.run("toy", cfg)
    events, _ = load_trace(str(tmp_path))
    return cfg, events


# ---- data readiness -----------------------------------------------------------------------------


def _readiness_nodes() -> list[ToyNode]:
    return [
        ToyNode("gen", "actor", "generate", ["packed_prompts"], ["seq"]),
        ToyNode("slow", "rew", "inference", ["seq"], ["score"], sleep_s=0.2),
        ToyNode("train", "actor", "train_step", ["seq", "score"]),
    ]


@pytest.mark.parametrize("master", [Master, NoInputWait])
def test_an_mfc_waits_for_all_its_inputs(tmp_path, monkeypatch, master):
    """`train` reads seq (ready at once) and score (0.2 s later). Dispatched early, it finds
    no score anywhere: the master cannot place the fetch, or the worker holds no data."""
    if master is Master:
        cfg, events = _run(tmp_path, monkeypatch, master, _readiness_nodes(), total_steps=3)
        check_dependencies(events, cfg.dfg())
    else:
        with pytest.raises((RunFailure, KeyError)):
            _run(tmp_path, monkeypatch, master, _readiness_nodes(), total_steps=3)


# ---- the parameter-version rules ----------------------------------------------------------------


def _versions(events: list[Any], mfc: str) -> dict[int, int]:
    return {e.step: e.version for e in events if e.mfc == mfc}


@pytest.mark.parametrize("master", [Master, NoPreviousTrainWait])
def test_a_call_reads_the_weights_of_the_previous_train_step(tmp_path, monkeypatch, master):
    """gen of step t must read version t-1 (t-1 train steps done). The slow score keeps the
    actor's worker idle after gen(t), so a master that does not wait runs gen(t+1) early."""
    nodes = [
        ToyNode("gen", "actor", "generate", ["packed_prompts"], ["seq"]),
        ToyNode("score", "rew", "inference", ["seq"], ["rew"], sleep_s=0.2),
        ToyNode("train", "actor", "train_step", ["seq", "rew"], sleep_s=0.05),
    ]
    _, events = _run(tmp_path, monkeypatch, master, nodes, total_steps=4)
    expected = {t: t - 1 for t in range(1, 5)}
    if master is Master:
        assert _versions(events, "gen") == expected
    else:
        assert _versions(events, "gen") != expected


@pytest.mark.parametrize("master", [Master, TrainWaitsOnlyForRunning])
def test_train_waits_for_calls_on_its_model_that_become_ready_late(tmp_path, monkeypatch, master):
    """actor_inf becomes ready only after the slow score; train reads only seq, so it is ready
    first. actor_inf of step t must still read version t-1 (the weights gen used)."""
    nodes = [
        ToyNode("gen", "actor", "generate", ["packed_prompts"], ["seq"]),
        ToyNode("score", "rew", "inference", ["seq"], ["rew"], sleep_s=0.2),
        ToyNode("actor_inf", "actor", "inference", ["rew"], ["logp"]),
        ToyNode("train", "actor", "train_step", ["seq"], sleep_s=0.05),
    ]
    _, events = _run(tmp_path, monkeypatch, master, nodes, total_steps=3)
    expected = {t: t - 1 for t in range(1, 4)}
    assert _versions(events, "gen") == expected
    if master is Master:
        assert _versions(events, "actor_inf") == expected
    else:
        assert _versions(events, "actor_inf") != expected


# ---- worker exclusivity ---------------------------------------------------------------------------

BUSY_KINDS = (Kind.MFC, Kind.FETCH_BATCH, Kind.SEND, Kind.SAVE)


class CountingTransport:
    """Wraps a transport; records the most requests ever outstanding on one worker."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.outstanding: collections.Counter[int] = collections.Counter()
        self.peak: collections.Counter[int] = collections.Counter()
        self.worker_of: dict[Any, int] = {}

    def submit(self, worker: int, kind: Kind, payload: Any = None, frees: Any = ()) -> Any:
        handle = self.inner.submit(worker, kind, payload, frees)
        if kind in BUSY_KINDS:
            self.worker_of[handle] = worker
            self.outstanding[worker] += 1
            self.peak[worker] = max(self.peak[worker], self.outstanding[worker])
        return handle

    def result(self, handle: Any) -> Any:
        if handle in self.worker_of:
            self.outstanding[self.worker_of.pop(handle)] -= 1
        return self.inner.result(handle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def counting_transports(monkeypatch: Any) -> list[CountingTransport]:
    """Every transport the runner makes from now on, wrapped in a CountingTransport (the list
    fills as runs start; the last one is the latest run's)."""
    counters: list[CountingTransport] = []
    make = runner.make_transport

    def counting(cfg: Any) -> Any:
        counters.append(CountingTransport(make(cfg)))
        return counters[-1]

    monkeypatch.setattr(runner, "make_transport", counting)
    return counters


@pytest.mark.parametrize("master", [Master, NoIdleCheck])
def test_a_worker_runs_one_call_at_a_time(tmp_path, monkeypatch, master):
    """rew, ref and critic share worker 1: the master may give it one call at a time only
    (in mode=ray the order of point-to-point sends depends on it)."""
    counters = counting_transports(monkeypatch)
    allocation = {"actor": 0, "rew": 1, "ref": 1, "critic": 1}
    _run(tmp_path, monkeypatch, master, ppo_like_nodes(0.05), total_steps=2, allocation=allocation)
    peak = max(counters[-1].peak.values())
    if master is Master:
        assert peak == 1
    else:
        assert peak > 1


@pytest.mark.parametrize("master", [Master, NoIdleCheck])
def test_a_batch_is_not_fetched_while_the_data_worker_runs_a_call(tmp_path, monkeypatch, master):
    """The data worker is the actor's: the slow gen of step 2 runs on it when step 1 ends (its
    train is on worker 1) and the batch of step 3 may be fetched; the fetch must wait."""
    counters = counting_transports(monkeypatch)
    nodes = [
        ToyNode("gen", "actor", "generate", ["packed_prompts"], ["seq"], sleep_s=0.2),
        ToyNode("train", "critic", "train_step", ["seq"]),
    ]
    _run(tmp_path, monkeypatch, master, nodes, total_steps=3, allocation={"actor": 0, "critic": 1})
    peak = max(counters[-1].peak.values())
    if master is Master:
        assert peak == 1
    else:
        assert peak > 1


# ---- the checkpoint barrier -----------------------------------------------------------------------


@pytest.mark.parametrize("master", [Master, NoCheckpointBarrier])
def test_no_call_of_a_later_step_starts_before_the_due_checkpoint(tmp_path, monkeypatch, master):
    """A checkpoint of step s is one consistent step boundary: every call of a later step
    starts after its save ends. The slow critic_train keeps step s open while actor_train(s)
    is done, so a master without the barrier starts actor_gen(s+1) first."""
    nodes = ppo_like_nodes(0.02)
    nodes[5].sleep_s = 0.3  # critic_train
    _run(tmp_path, monkeypatch, master, nodes, total_steps=4, save_freq_steps=1)
    events, _ = load_trace(str(tmp_path))
    saves = load_saves(str(tmp_path))
    assert sorted(saves) == [1, 2, 3, 4]
    early = [e for e in events if e.step > 1 and e.start < saves[e.step - 1][1]]
    if master is Master:
        assert early == []
    else:
        assert early


class OrderTransport:
    """Wraps a transport; records the order of batch fetches and checkpoint saves."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.log: list[str] = []

    def submit(self, worker: int, kind: Kind, payload: Any = None, frees: Any = ()) -> Any:
        if kind == Kind.FETCH_BATCH:
            self.log.append("fetch")
        return self.inner.submit(worker, kind, payload, frees)

    def call_all(self, workers: list[int], kind: Kind, payload: Any = None) -> list[Any]:
        if kind == Kind.SAVE:
            self.log.append("save")
        return self.inner.call_all(workers, kind, payload)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("master", [Master, FetchesPastTheCheckpoint])
def test_the_checkpoint_of_step_s_is_written_after_exactly_s_fetches(tmp_path, monkeypatch, master):
    """The loader's position is part of the checkpoint: resuming from step s must fetch batch
    s+1 next, so batch s+1 may not be fetched before the checkpoint of step s. The slow
    critic_train keeps step s open on worker 1 while the data worker (the actor's) is idle."""
    transports: list[OrderTransport] = []
    make = runner.make_transport

    def ordered(cfg: Any) -> Any:
        transports.append(OrderTransport(make(cfg)))
        return transports[-1]

    monkeypatch.setattr(runner, "make_transport", ordered)
    nodes = ppo_like_nodes(0.02)
    nodes[5].sleep_s = 0.3  # critic_train
    allocation = {"actor": 0, "rew": 1, "ref": 1, "critic": 1}
    _run(
        tmp_path,
        monkeypatch,
        master,
        nodes,
        total_steps=3,
        save_freq_steps=1,
        allocation=allocation,
    )
    log = transports[-1].log
    fetched_before_save = [log[:i].count("fetch") for i, x in enumerate(log) if x == "save"]
    if master is Master:
        assert fetched_before_save == [1, 2, 3]
    else:
        assert fetched_before_save != [1, 2, 3]


# ---- steps in flight ----------------------------------------------------------------------------


@pytest.mark.parametrize("master", [Master, ThreeStepsInFlight])
def test_at_most_two_steps_are_in_flight_with_max_staleness_0(tmp_path, monkeypatch, master):
    """k = 0: no call of step s+2 starts before the last call of step s has ended. gen and ref
    run on an untrained model (no version to wait for), so only the bound holds them back;
    the slow train of step s runs on the critic's worker, not on the data worker."""
    nodes = [
        ToyNode("gen", "actor", "generate", ["packed_prompts"], ["seq"]),
        ToyNode("ref", "ref", "inference", ["packed_prompts"], ["r"]),
        ToyNode("train", "critic", "train_step", ["seq", "r"], sleep_s=0.2),
    ]
    _, events = _run(tmp_path, monkeypatch, master, nodes, total_steps=5)
    end = {s: max(e.end for e in events if e.step == s) for s in range(1, 6)}
    early = [e for e in events if e.step > 2 and e.start < end[e.step - 2] - EPS_US]
    if master is Master:
        assert early == []
    else:
        assert early


# ---- frees after the last consumer ----------------------------------------------------------------


@pytest.mark.parametrize("master", [Master, FreesOnlyAtStepEnd])
def test_inputs_are_freed_after_their_last_consumer(tmp_path, monkeypatch, master):
    """`a` is freed on worker 1 as soon as `first` (its only reader there) ends: `second` then
    runs with exactly b and c... of one step: 2 entries per sample (a late master keeps 3)."""
    spy = Spy(monkeypatch, store_check=True)
    nodes = [
        ToyNode("gen", "actor", "generate", ["packed_prompts"], ["a"]),
        ToyNode("first", "x1", "inference", ["a"], ["b"], 0.02),
        ToyNode("second", "x2", "inference", ["b"], ["c"], 0.02),
    ]
    n = 4
    allocation = {"actor": 0, "x1": 1, "x2": 1}
    monkeypatch.setattr(runner, "Master", master)
    cfg = toy_config(tmp_path, nodes, total_steps=4, n_seqs=n, allocation=allocation)
    runner.run("toy", cfg)
    events, _ = load_trace(str(tmp_path))
    stores = sorted(e.store for e in events if e.mfc == "second")
    assert spy.store_sizes == [[0, 0]]  # everything is freed by the end either way
    if master is FreesOnlyAtStepEnd:
        assert stores != [2 * n] * 4
    else:
        assert stores == [2 * n] * 4


@pytest.mark.parametrize("master", [Master, FreesAfterFirstConsumer])
def test_an_input_lives_until_its_last_consumer(tmp_path, monkeypatch, master):
    """`seq` has two readers on other workers; the slow one reads it last. Freed early, it is
    gone from the master's metadata (or a worker's store) when `late` is dispatched."""
    nodes = [
        ToyNode("gen", "actor", "generate", ["packed_prompts"], ["seq"]),
        ToyNode("fast", "x1", "inference", ["seq"], ["b"]),
        ToyNode("slow", "x2", "inference", ["seq"], ["c"], 0.2),
        ToyNode("late", "x3", "inference", ["seq", "c"], ["d"]),
    ]
    if master is Master:
        _, events = _run(tmp_path, monkeypatch, master, nodes, total_steps=3)
        assert len(by_key(events)) == 12
    else:
        with pytest.raises((RunFailure, KeyError)):
            _run(tmp_path, monkeypatch, master, nodes, total_steps=3)
