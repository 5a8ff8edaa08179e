"""The master: runs the DFG for many steps, dispatching each MFC as soon as it may run.

It holds metadata only: for each step, the sample ids, which worker holds each key, and which
MFCs still have to read it. An MFC of step t is dispatched when
  - its step's batch is loaded and all its input keys exist;
  - the parameter-version rule allows it: a generate/inference call on model M waits for the
    train_step of M at step t-1; a train_step of M waits for every other call on M at step t
    and for its own step t-1;
  - a call on a weight copy C of a trained model M (`weight_copies`, e.g. the actor's
    generation copy on its own worker) waits until the weights sent to C have version
    >= t-1-k, k = `max_staleness` (k=0: the previous rule, through the copy). After every
    train_step of M the master fetches M's weights (Kind.GET_WEIGHTS) and queues them on each
    copy's worker (Kind.SET_WEIGHTS) before any later call there;
  - its worker is idle: each worker runs one call at a time; so is every worker it fetches
    from when data moves by explicit sends (mode=ray); in mode=local a consumer reads a busy
    producer's store by reference;
  - no barrier (a checkpoint or an evaluation) is due before step t;
  - with a sampling loop (a filter MFC, see `FilterLoop`), an MFC outside the loop waits until
    the loop has found the step's `n_seqs` samples.
At most k+2 steps are in flight (k = max_staleness). Keys are freed on every worker that holds
them once their last consumer has finished.

Sampling loop: the loop's MFCs run on one dataset batch (a round); the filter's result names the
samples that qualified. Until `n_seqs` have, and for at most `max_rounds` rounds, the master
keeps those, frees the rest, loads another batch for the same step and runs the loop again
(each round's calls are seeded apart). Then the step's ids become the `n_seqs` kept samples and
the MFCs outside the loop run on them. No later step is loaded while a loop is open, so the
loader's order, and with it a run, does not depend on timing. The loop's MFCs report the mean
of their rounds' stats; the filter adds the loop's counts (rounds, generated, qualified, filled,
cap_reached).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from realflow.api.data import SequenceSample
from realflow.api.dfg import DataflowGraph, MFCDef
from realflow.experiments.allocation import MeshPlan
from realflow.system.mesh import ReallocResult
from realflow.system.mesh_dispatch import MeshDispatch, MeshRun
from realflow.system.transport import Transport, WorkerFailure
from realflow.system.worker import Kind, MFCRequest, MFCResult, Transfer

logger = logging.getLogger(__name__)


class RunFailure(RuntimeError):
    """A run stopped by a failed, dead or timed-out call; the message names MFC, worker, step.
    `traceback_text` is the failed call's traceback (empty for a death or a timeout)."""

    def __init__(self, message: str, traceback_text: str = "", timed_out: bool = False):
        super().__init__(message)
        self.traceback_text = traceback_text
        self.timed_out = timed_out  # a call is still running: shutting down must not wait for it


@dataclasses.dataclass
class StepState:
    step: int
    ids: list[Any] | None = None
    meta: dict[str, SequenceSample] = dataclasses.field(default_factory=dict)  # key -> meta
    holders: dict[str, set[int]] = dataclasses.field(default_factory=dict)  # key -> workers
    # key -> worker -> the ids of the key it holds (mesh MFCs split samples over dp ranks)
    parts: dict[str, dict[int, set[Any]]] = dataclasses.field(default_factory=dict)
    consumers: dict[str, set[str]] = dataclasses.field(default_factory=dict)  # key -> MFCs left
    missing: dict[str, int] = dataclasses.field(default_factory=dict)  # MFC -> input keys absent
    ready: set[str] = dataclasses.field(default_factory=set)  # all inputs exist, not launched
    done: set[str] = dataclasses.field(default_factory=set)
    running: set[str] = dataclasses.field(default_factory=set)
    stats: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    end: float = 0.0  # wall time (time.time()) its last MFC ended, as the worker reported it
    producer: dict[str, int] = dataclasses.field(default_factory=dict)  # key -> its writer
    # The sampling loop (see the module docstring); `resolved` stays True without one.
    resolved: bool = True
    round: int = 1
    refill_due: bool = False  # a round is over and its successor's batch is not loaded yet
    kept: list[Any] = dataclasses.field(default_factory=list)  # ids kept, in order
    kept_meta: dict[str, list[SequenceSample]] = dataclasses.field(default_factory=dict)
    loop_counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    # MFC -> the stats of each of its rounds (every loop MFC reports their mean)
    loop_stats: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)
    # Mesh MFCs running: name -> the workers still running it and the results so far.
    mesh_runs: dict[str, MeshRun] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Call:
    kind: Kind
    worker: int
    step: int
    mfc: str | None
    start: float
    busy: bool  # holds the worker (one busy call per worker at a time)


class Master:
    """Drives one run. `placement[role]` is the worker of each role; `data_worker` loads data."""

    def __init__(
        self,
        dfg: DataflowGraph,
        transport: Transport,
        placement: dict[str, int],
        data_worker: int,
        mfc_timeout_s: float = 0.0,
        on_call: Callable[[MFCResult], None] | None = None,
        fetch_payload: Callable[[int], Any] | None = None,
        weight_copies: dict[str, str] | None = None,
        max_staleness: int = 0,
        mesh_plan: MeshPlan | None = None,
        on_realloc: Callable[[ReallocResult], None] | None = None,
    ):
        self.dfg = dfg
        # With a mesh allocation every MFC runs on the workers of its mesh (MeshDispatch);
        # without one, on its role's worker (`placement`).
        self.meshes = MeshDispatch(self, mesh_plan, on_realloc) if mesh_plan else None
        self.transport = transport
        self.placement = placement
        self.data_worker = data_worker
        self.timeout = mfc_timeout_s or None
        self.on_call = on_call or (lambda r: None)
        # What FETCH_BATCH of step t asks the data worker for (None: the next training batch).
        self.fetch_payload = fetch_payload or (lambda step: None)
        self.mfcs = dfg.mfcs
        self.by_name = {m.name: m for m in self.mfcs}
        self.rank = {m.name: i for i, m in enumerate(self.mfcs)}  # dispatch in DFG order
        self.trainer_of = {m.model_name: m.name for m in self.mfcs if m.is_train}
        # Weight copies (copy role -> trained role): the version last queued on each copy.
        self.copies = dict(weight_copies or {})
        self.copies_of: dict[str, list[str]] = collections.defaultdict(list)
        for copy, source in sorted(self.copies.items()):
            self.copies_of[source].append(copy)
        self.copy_version = {c: 0 for c in self.copies}
        self.max_staleness = max_staleness
        self.calls_on_model: dict[str, list[str]] = collections.defaultdict(list)
        for m in self.mfcs:
            if not m.is_train:
                self.calls_on_model[m.model_name].append(m.name)
        self.filter = dfg.filter  # the filter MFC of the sampling loop, or None
        self.loop = dfg.loop  # the names of the loop's MFCs (the filter's and its ancestors')
        # The first step whose loop reaches max_rounds is a warning, the later ones are not.
        self.cap_warned = False
        self.readers: dict[str, set[str]] = collections.defaultdict(set)  # key -> its MFCs
        for m in self.mfcs:
            for key in m.input_keys:
                self.readers[key].add(m.name)
        self.calls: dict[Any, Call] = {}
        self.busy: collections.Counter[int] = collections.Counter()  # worker -> busy calls
        self.steps: dict[int, StepState] = {}
        # Released data not yet told to its worker: it rides along with the worker's next call.
        self.pending_frees: dict[int, list[tuple[list[Any], list[str]]]] = collections.defaultdict(
            list
        )

    def worker_of(self, mfc: MFCDef) -> int:
        return self.placement[mfc.model_name]

    # ---- the loop ---------------------------------------------------------------------------

    def run(
        self,
        first_step: int,
        last_step: int,
        on_step_end: Callable[[int, dict[str, dict[str, float]], float], None],
        save_after: Callable[[int], bool],
        save: Callable[[int], None],
        stop: Callable[[], bool] | None = None,
    ) -> int:
        """Run steps first_step..last_step (inclusive). `save(step)` (a checkpoint, an
        evaluation: a barrier) is called with no call in flight after every step for which
        `save_after(step)` holds; no later step starts before it returns. When `stop()` turns true, no
        new step starts: the steps in flight finish and the run ends after the last of them
        (`self.stopped` is then set). Returns the last step that ran (first_step - 1: none).

        `on_step_end(step, stats, step_s)`: `step_s` is the step period, the wall time from the
        end of the previous step (or from this call, for the first step) to the end of this
        one, where a step ends when its last MFC ends (the `end` the worker reports, as in
        trace.json). Two steps are in flight at once, so this is the period, not the latency
        from fetching the batch (about twice as long); a checkpoint written between two steps
        counts in the later one."""
        self.last_step = last_step
        self.stopped = False
        self.copy_version = {c: first_step - 1 for c in self.copies}  # as saved with the step
        if self.meshes is not None:
            self.meshes.start(first_step)
        next_fetch = first_step
        last_end = time.time()
        while True:
            self._observe_stop(stop, next_fetch)
            finished = [s for s in sorted(self.steps) if len(self.steps[s].done) == len(self.mfcs)]
            for s in finished:
                state = self.steps.pop(s)
                self._free(state, sorted(state.holders))
                self._flush_frees()
                on_step_end(s, state.stats, max(0.0, state.end - last_end))
                last_end = max(last_end, state.end)
                if save_after(s):
                    self._drain()
                    save(s)
            barrier = min((s for s in self.steps if save_after(s)), default=None)
            self._observe_stop(stop, next_fetch)
            self._fetch_refills()
            if next_fetch <= self.last_step and self._may_fetch(next_fetch, barrier):
                self.steps[next_fetch] = self._new_step(next_fetch)
                payload = self.fetch_payload(next_fetch)
                self._submit(self.data_worker, Kind.FETCH_BATCH, payload, next_fetch, None, True)
                next_fetch += 1
            self._dispatch_ready(barrier)
            if not self.steps and next_fetch > self.last_step:
                self._drain()
                return self.last_step
            self._collect()

    def _observe_stop(self, stop: Callable[[], bool] | None, next_fetch: int) -> None:
        if stop is None or self.stopped or not stop():
            return
        self.stopped = True
        self.last_step = min(self.last_step, next_fetch - 1)
        logger.info("stop requested: no new steps; finishing up to step %d", self.last_step)

    def _may_fetch(self, step: int, barrier: int | None) -> bool:
        if barrier is not None and step > barrier:
            return False
        if any(not s.resolved for s in self.steps.values()):
            return False  # a sampling loop still reads the dataset: keep its order fixed
        if self.steps and step > min(self.steps) + 1 + self.max_staleness:  # k+2 in flight
            return False
        return self._idle(self.data_worker)

    def _new_step(self, step: int) -> StepState:
        missing = {m.name: len(set(m.input_keys)) for m in self.mfcs}
        ready = {n for n, k in missing.items() if k == 0}
        return StepState(step, missing=missing, ready=ready, resolved=self.filter is None)

    def _fetch_refills(self) -> None:
        """Load the next batch of a sampling loop that needs one."""
        for step in sorted(self.steps):
            state = self.steps[step]
            if state.refill_due and self._idle(self.data_worker):
                state.refill_due = False
                payload = self.fetch_payload(step)
                self._submit(self.data_worker, Kind.FETCH_BATCH, payload, step, None, busy=True)

    def _idle(self, worker: int) -> bool:
        return self.busy[worker] == 0

    def _dispatch_ready(self, barrier: int | None) -> None:
        for step in sorted(self.steps):
            if barrier is not None and step > barrier:
                return
            state = self.steps[step]
            if state.ids is None:
                continue
            for name in sorted(state.ready, key=self.rank.__getitem__):
                if not state.resolved and name not in self.loop:
                    continue  # runs on the samples the sampling loop keeps
                mfc = self.by_name[name]
                if self.meshes is not None:
                    if self._version_allows(mfc, state):
                        self.meshes.try_launch(mfc, state)
                    continue
                if not self._idle(self.worker_of(mfc)) or not self._version_allows(mfc, state):
                    continue
                sources = self._sources(mfc, state)
                if not self.transport_sends or all(self._idle(w) for w in sources):
                    self._launch(mfc, state, sources)

    def _version_allows(self, mfc: MFCDef, state: StepState) -> bool:
        if mfc.model_name in self.copies:  # weights at most max_staleness steps old
            return self.copy_version[mfc.model_name] >= state.step - 1 - self.max_staleness
        prev = self.steps.get(state.step - 1)
        trainer = self.trainer_of.get(mfc.model_name)
        if trainer is not None and prev is not None and trainer not in prev.done:
            return False  # parameter version: step t reads weights after train of step t-1
        if mfc.is_train:
            if any(n not in state.done for n in self.calls_on_model[mfc.model_name]):
                return False
        return True

    def _sources(self, mfc: MFCDef, state: StepState) -> dict[int, list[str]]:
        """The input keys of `mfc` that its worker lacks, by the worker they are fetched from."""
        dst = self.worker_of(mfc)
        by_src: dict[int, list[str]] = {}
        for key in mfc.input_keys:
            if dst not in state.holders[key]:
                # Read by reference (no sends), the source may be busy: take the producer, whose
                # copy exists from its result on (another holder's call may not have fetched it
                # yet). With sends, any holder once idle.
                src = min(state.holders[key]) if self.transport_sends else state.producer[key]
                by_src.setdefault(src, []).append(key)
        return by_src

    def _launch(self, mfc: MFCDef, state: StepState, sources: dict[int, list[str]]) -> None:
        dst = self.worker_of(mfc)
        transfers = [
            Transfer(src, _merge_meta([state.meta[k] for k in keys]))
            for src, keys in sorted(sources.items())
        ]
        self.transport.before_mfc(dst, transfers)
        for t in transfers:
            self._submit(t.src, Kind.SEND, (dst, t), state.step, mfc.name, busy=True)
            for key in t.meta.keys:
                self._hold(state, key, dst, t.meta.ids)
        req = MFCRequest(mfc.name, state.step, list(state.ids or []), transfers, state.round)
        self._submit(dst, Kind.MFC, req, state.step, mfc.name, busy=True)
        state.ready.discard(mfc.name)
        state.running.add(mfc.name)

    def _hold(self, state: StepState, key: str, worker: int, ids: list[Any]) -> None:
        """Worker `worker` now holds samples `ids` of `key` too."""
        state.holders[key].add(worker)
        state.parts[key].setdefault(worker, set()).update(ids)

    def _submit(
        self, worker: int, kind: Kind, payload: Any, step: int, mfc: str | None, busy: bool
    ) -> None:
        if kind == Kind.SEND and not self.transport_sends:
            return
        frees = self.pending_frees.pop(worker, [])
        handle = self.transport.submit(worker, kind, payload, frees)
        self.calls[handle] = Call(kind, worker, step, mfc, time.time(), busy)
        self.busy[worker] += busy

    @property
    def transport_sends(self) -> bool:
        return getattr(self.transport, "sends_data", False)

    # ---- results ----------------------------------------------------------------------------

    def _collect(self) -> None:
        if not self.calls:
            return
        wait_s = None
        if self.timeout:
            oldest = (
                min(c.start for c in self.calls.values() if c.busy)
                if any(c.busy for c in self.calls.values())
                else time.time()
            )
            wait_s = max(0.0, oldest + self.timeout - time.time())
        done = self.transport.wait(list(self.calls), wait_s)
        # Checked on every pass, so a hung call times out even while others keep finishing.
        self._check_timeouts(exclude=set(done))
        for handle in done:
            call = self.calls.pop(handle)
            self.busy[call.worker] -= call.busy
            try:
                value = self.transport.result(handle)
            except WorkerFailure as e:
                raise RunFailure(self._describe(call) + f" failed: {e}", e.traceback_text) from (
                    e.cause or e
                )
            self._on_result(call, value)

    def _check_timeouts(self, exclude: set[Any]) -> None:
        if not self.timeout:
            return
        now = time.time()
        for handle, call in self.calls.items():
            if handle not in exclude and call.busy and now - call.start >= self.timeout:
                raise RunFailure(
                    self._describe(call) + f" timed out after {self.timeout:g} s (mfc_timeout_s)",
                    timed_out=True,
                )

    def _describe(self, call: Call) -> str:
        what = (
            f"MFC '{call.mfc}'"
            if call.kind == Kind.MFC
            else f"{call.kind.value}" + (f" for MFC '{call.mfc}'" if call.mfc else "")
        )
        return f"{what} on worker {call.worker} at step {call.step}"

    def _on_result(self, call: Call, value: Any) -> None:
        state = self.steps.get(call.step)
        if call.kind == Kind.FETCH_BATCH:
            assert state is not None
            meta: SequenceSample = value
            state.ids = list(meta.ids)
            for key in meta.keys:
                self._add_key(state, key, meta.select([key]), call.worker)
        elif call.kind == Kind.MFC and self.meshes is not None:
            assert state is not None
            self.meshes.on_result(state, call, value)
        elif call.kind == Kind.MFC:
            assert state is not None
            result: MFCResult = value
            self.on_call(result)
            mfc = self.by_name[result.mfc]
            outputs = [(call.worker, result.meta)] if result.meta is not None else []
            self._finish_mfc(state, mfc, result.stats, result.end, outputs, call, result)
        elif call.kind == Kind.REALLOC:
            assert self.meshes is not None
            self.meshes.on_realloc(value)
        elif call.kind == Kind.GET_WEIGHTS:
            version, weights = value
            assert call.mfc is not None
            for copy in self.copies_of[self.by_name[call.mfc].model_name]:
                payload = (copy, version, weights)
                worker = self.placement[copy]
                self._submit(worker, Kind.SET_WEIGHTS, payload, call.step, call.mfc, True)
                self.copy_version[copy] = version  # every later call on the copy reads it

    def _finish_mfc(
        self,
        state: StepState,
        mfc: MFCDef,
        stats: dict[str, float],
        end: float,
        outputs: list[tuple[int, SequenceSample]],
        call: Call,
        result: MFCResult | None = None,
    ) -> None:
        """An MFC is done: its stats, its outputs (worker, meta) in sample order, its inputs
        released, and what its end enables."""
        state.running.discard(mfc.name)
        state.done.add(mfc.name)
        state.stats[mfc.name] = stats
        state.end = max(state.end, end)
        if mfc.name in self.loop:
            state.loop_stats.setdefault(mfc.name, []).append(stats)
        if outputs:
            merged = SequenceSample.gather([m for _, m in outputs]) if len(outputs) > 1 else None
            for key in outputs[0][1].keys:
                meta = (merged or outputs[0][1]).select([key])
                self._add_key(state, key, meta, outputs[0][0])
                for w, part in outputs[1:]:
                    self._hold(state, key, w, part.ids)
                state.parts[key][outputs[0][0]] = set(outputs[0][1].ids)
        self._release_inputs(state, mfc)
        if mfc is self.filter:
            assert result is not None
            self._after_filter(state, result)
        if mfc.is_train and self.copies_of.get(mfc.model_name):
            source = mfc.model_name
            self._submit(call.worker, Kind.GET_WEIGHTS, source, call.step, mfc.name, True)

    def _add_key(self, state: StepState, key: str, meta: SequenceSample, worker: int) -> None:
        first = key not in state.meta
        state.meta[key] = meta
        state.holders[key] = {worker}
        state.parts[key] = {worker: set(meta.ids)}
        state.producer[key] = worker
        state.consumers[key] = set(self.readers[key])
        for name in self.readers[key] if first else ():
            state.missing[name] -= 1
            if state.missing[name] == 0:
                state.ready.add(name)

    def _release_inputs(self, state: StepState, mfc: MFCDef) -> None:
        finished = []
        for key in mfc.input_keys:
            state.consumers[key].discard(mfc.name)
            if not state.consumers[key]:
                finished.append(key)
        self._free(state, finished)

    # ---- the sampling loop ------------------------------------------------------------------

    def _after_filter(self, state: StepState, result: MFCResult) -> None:
        """Keep what the filter passed (up to n_seqs for the step); then close the loop or start
        its next round."""
        assert self.filter is not None and self.filter.filter_loop is not None
        round_ids = list(state.ids or [])
        passed = set(result.meta.ids) if result.meta is not None else set()
        unknown = passed - set(round_ids)
        if unknown:
            raise RunFailure(
                f"filter MFC '{self.filter.name}' at step {state.step} returned samples it was "
                f"not given: {sorted(unknown, key=str)[:5]}"
            )
        need = self.filter.n_seqs - len(state.kept)
        keep = [i for i in round_ids if i in passed][:need]
        counts = state.loop_counts
        counts.update(rounds=1, generated=len(round_ids), qualified=len(passed))
        at_cap = state.round >= self.filter.filter_loop.max_rounds
        if len(keep) < need and at_cap:
            short = need - len(keep)
            fill = [i for i in round_ids if i not in passed][:short]
            counts.update(filled=len(fill))
            log = logger.debug if self.cap_warned else logger.warning
            self.cap_warned = True
            log(
                "step %d: %d of %d samples passed filter '%s' in %d batches (max_rounds); the "
                "batch is topped up with %d that did not (this and later steps: metrics "
                "%s/filled and %s/cap_reached)",
                state.step, len(state.kept) + len(keep), self.filter.n_seqs, self.filter.name,
                state.round, len(fill), self.filter.name, self.filter.name,
            )  # fmt: skip
            taken = set(keep) | set(fill)
            keep = [i for i in round_ids if i in taken]
        self._keep_samples(state, round_ids, keep)
        if len(state.kept) == self.filter.n_seqs:
            self._close_loop(state, at_cap)
        else:
            self._next_round(state)

    def _keep_samples(self, state: StepState, round_ids: list[Any], keep: list[Any]) -> None:
        """Free the round's other samples everywhere, and the kept ones' copies on workers that
        fetched them (the producer of each key keeps them); remember the kept samples' meta."""
        kept = set(keep)
        dropped = [i for i in round_ids if i not in kept]
        for key, workers in state.holders.items():
            producer = state.producer[key]
            for w in sorted(workers):
                ids = dropped if w == producer else round_ids
                if ids:
                    self.pending_frees[w].append((ids, [key]))
            state.holders[key] = {producer}
            state.parts[key] = {producer: state.parts[key].get(producer, set())}
        if keep:
            rows = [i for i, sample_id in enumerate(round_ids) if sample_id in kept]
            for key, meta in state.meta.items():
                state.kept_meta.setdefault(key, []).append(meta.index(rows))
            state.kept.extend(round_ids[i] for i in rows)

    def _next_round(self, state: StepState) -> None:
        """Run the loop again on a fresh batch: its MFCs wait for the batch's keys anew."""
        state.round += 1
        state.ids = None
        state.refill_due = True
        state.meta.clear()  # only dataset and loop keys exist yet; the kept ones' are saved
        state.done -= self.loop
        state.missing = {m.name: len(set(m.input_keys)) for m in self.mfcs}
        state.ready = {n for n, k in state.missing.items() if k == 0 and n not in state.done}

    def _close_loop(self, state: StepState, at_cap: bool) -> None:
        """The step's ids become the kept samples; the MFCs outside the loop may run."""
        assert self.filter is not None
        state.ids = list(state.kept)
        for key, metas in state.kept_meta.items():
            state.meta[key] = SequenceSample.gather(metas)
        state.resolved = True
        for name, per_round in state.loop_stats.items():  # every round weighs the same
            state.stats[name] = _mean_stats(per_round)
        counts = state.loop_counts
        stats = state.stats[self.filter.name]
        stats.update({k: float(counts[k]) for k in ("rounds", "generated", "qualified", "filled")})
        stats["cap_reached"] = float(at_cap and counts["filled"] > 0)

    def _free(self, state: StepState, keys: list[str]) -> None:
        by_worker: dict[int, list[str]] = {}
        for key in keys:
            for w in state.holders.pop(key, set()):
                by_worker.setdefault(w, []).append(key)
            state.consumers.pop(key, None)
            state.parts.pop(key, None)
        for w, ks in sorted(by_worker.items()):
            self.pending_frees[w].append((list(state.ids or []), ks))

    def _flush_frees(self) -> None:
        """Send the frees still waiting (workers with no call coming in this step)."""
        for w in sorted(self.pending_frees):
            self._submit(w, Kind.FREE, None, -1, None, busy=False)

    def _drain(self) -> None:
        while self.calls:
            self._collect()


def _mean_stats(all_stats: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over the dicts that report the key."""
    values: dict[str, list[float]] = collections.defaultdict(list)
    for stats in all_stats:
        for k, v in stats.items():
            values[k].append(float(v))
    return {k: sum(v) / len(v) for k, v in values.items()}


def _merge_meta(metas: list[SequenceSample]) -> SequenceSample:
    merged = metas[0].meta()
    for m in metas[1:]:
        merged.update_(m.meta())
    return merged
