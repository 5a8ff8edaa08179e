"""Running an experiment: run directory, workers, master loop, checkpoints, resume, failures."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from realflow.api.callbacks import CallbackError, CallbackList, RunContext, build_callbacks
from realflow.api.config import ConfigError, to_dict
from realflow.api.dfg import DataflowGraph, write_dfg_files
from realflow.api.registry import absolute_plugin_specs
from realflow.api.tracebacks import user_frames
from realflow.experiments.allocation import mesh_plan, uses_meshes
from realflow.experiments.common import ExperimentConfig
from realflow.system.checkpoint import CheckpointError, latest_checkpoint, write_checkpoint
from realflow.system.evaluation import Evaluation, batch_sizes, setup_info
from realflow.system.interrupt import Interrupted, StopRequest
from realflow.system.master import Master, RunFailure
from realflow.system.observe import MetricsWriter, Tracer, drop_rows_after
from realflow.system.preflight import RoleCheckError
from realflow.system.rundir import RunDirError, default_output_dir, open_run_dir
from realflow.system.transport import Transport, WorkerFailure
from realflow.system.worker import Kind, WorkerSpec

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    output_dir: str
    rows: list[dict[str, Any]]
    last_checkpoint: str | None
    last_step: int = 0  # the last step that ran
    interrupted: bool = False  # a stop signal ended the run early
    saved_at_stop: bool = False  # ...and the checkpoint of its last step was written
    stop_reason: str = ""  # why a callback ended the run early ("": it did not)


def placement(cfg: ExperimentConfig, dfg: DataflowGraph) -> dict[str, int]:
    """Role -> worker index: `cfg.allocation`, or one worker per role in DFG order, except that
    a role on another role's base weights (`<role>.base_of`) shares its owner's worker. With a
    mesh allocation: the first worker of the mesh of the role's first MFC (for logs)."""
    roles = list(dict.fromkeys(m.model_name for m in dfg.mfcs))
    if uses_meshes(cfg.allocation):
        meshes = mesh_plan(cfg, dfg.mfcs).meshes
        return {m.model_name: meshes[m.name].workers[0] for m in reversed(dfg.mfcs)}
    if cfg.allocation:
        missing = [r for r in roles if r not in cfg.allocation]
        if missing:
            raise ValueError(f"allocation names no worker for roles {missing}; give every role one")
        used = sorted(set(cfg.allocation[r] for r in roles))
        renumber = {w: i for i, w in enumerate(used)}
        return {r: renumber[cfg.allocation[r]] for r in roles}
    specs = cfg.roles()
    owner = {r: specs[r].config.base_of or r for r in roles}
    workers = list(dict.fromkeys(owner[r] for r in roles))
    return {r: workers.index(owner[r]) for r in roles}


def worker_specs(
    cfg: ExperimentConfig,
    dfg: DataflowGraph,
    where: dict[str, int],
    eval_dfg: DataflowGraph | None = None,
) -> list[WorkerSpec]:
    if uses_meshes(cfg.allocation):
        return mesh_worker_specs(cfg, dfg)
    trained = {m.model_name for m in dfg.mfcs if m.is_train}
    source_role = dfg.mfc(dfg.sources()[0]).model_name
    n_workers = max(where.values()) + 1
    all_mfcs = dfg.mfcs + (eval_dfg.mfcs if eval_dfg is not None else [])
    specs = []
    for w in range(n_workers):
        roles = [r for r, i in where.items() if i == w]
        specs.append(
            WorkerSpec(
                index=w,
                config=cfg,
                roles=roles,
                trained_roles=[r for r in roles if r in trained],
                mfcs=[m for m in all_mfcs if where.get(m.model_name) == w],
                serves_dataset=where[source_role] == w,
                total_train_steps=max(1, cfg.total_steps * cfg.optimizer_steps_per_train_call()),
            )
        )
    return specs


def mesh_worker_specs(cfg: ExperimentConfig, dfg: DataflowGraph) -> list[WorkerSpec]:
    """A spec per worker of a mesh allocation: the MFCs whose mesh holds it, and their roles."""
    plan = mesh_plan(cfg, dfg.mfcs)
    data_worker = plan.meshes[dfg.sources()[0]].workers[0]
    specs = []
    for w in range(plan.n_workers):
        names = plan.on_worker(w)
        roles = list(dict.fromkeys(plan.roles[n] for n in names))
        specs.append(
            WorkerSpec(
                index=w,
                config=cfg,
                roles=roles,
                trained_roles=[r for r in roles if w in plan.train_mesh.get(r, ())],
                mfcs=[m for m in dfg.mfcs if m.name in names],
                serves_dataset=w == data_worker,
                total_train_steps=max(1, cfg.total_steps * cfg.optimizer_steps_per_train_call()),
                mesh_plan=plan,
            )
        )
    return specs


def make_transport(cfg: ExperimentConfig) -> Transport:
    if cfg.mode == "ray":
        from realflow.system.ray_transport import RayTransport

        return RayTransport(address=cfg.ray_address, dashboard=cfg.ray_dashboard)
    from realflow.system.transport import LocalTransport

    return LocalTransport()


def resume_config(cfg: ExperimentConfig, ckpt: str) -> ExperimentConfig:
    """The config with each trained role loading its weights from checkpoint `ckpt` (a role
    with adapters keeps its base checkpoint: its adapters come back with its engine state)."""
    cfg = copy.deepcopy(cfg)
    for role, spec in cfg.roles().items():
        path = os.path.join(ckpt, role)
        if os.path.isdir(path) and spec.config.adapters() is None:
            spec.config.path = path
            spec.config.init_from_actor = False
    return cfg


def run_experiment(name: str, cfg: ExperimentConfig) -> int:
    """The CLI's entry: run with SIGINT/SIGTERM handled, print how it ended. Exit codes: 0 done,
    1 a failed run, 2 a refused run directory or an impossible device (cuda without a GPU),
    128 + signal number when stopped by a signal."""
    stop = StopRequest()
    try:
        with stop.on_signals():
            result = run(name, cfg, stop)
    except (RunDirError, RoleCheckError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, CheckpointError) else 2
    except RunFailure as e:
        logger.error("run failed: %s\n%s", e, e.traceback_text)
        print(f"error: run failed: {e}", file=sys.stderr)
        frames = user_frames(e.traceback_text)
        if frames:
            print("in your code (most recent call last):\n" + "\n".join(frames), file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"error: {e}; no checkpoint written", file=sys.stderr)
        return 128 + e.signum
    if result.interrupted:
        print(interrupted_message(name, result, stop), file=sys.stderr)
        return stop.exit_code
    print(f"run directory: {result.output_dir}")
    return 0


def interrupted_message(name: str, result: RunResult, stop: StopRequest) -> str:
    """One line: where a stopped run saved, and the command that resumes it."""
    args = [
        a for a in sys.argv[1:] if not a.startswith(("recover_mode=", "output_dir=", "overwrite="))
    ]
    if args and args[0] == name:
        args = args[1:]
    resume = " ".join(
        [
            "python -m realflow.quickstart",
            name,
            *args,
            "recover_mode=auto",
            f"output_dir={result.output_dir}",
        ]
    )
    last = f"; last checkpoint {result.last_checkpoint}" if result.last_checkpoint else ""
    if result.saved_at_stop:
        where = f"saved {result.last_checkpoint}"
    elif not result.rows:
        where = "no step ran in this run" + last
    else:
        where = "not saved (save_on_interrupt=false)" + last
    if not result.last_checkpoint:
        return f"{stop.name}: stopped after step {result.last_step}; {where}; nothing to resume"
    return f"{stop.name}: stopped after step {result.last_step}; {where}. Resume with: {resume}"


def run(name: str, cfg: ExperimentConfig, stop: Callable[[], bool] | None = None) -> RunResult:
    """Run experiment `name` with `cfg` in its locked run directory (see rundir.py).

    Raises RunDirError for a directory it must not use, RunFailure when a call fails; `stop()`
    turning true ends the run early at a step boundary (RunResult.interrupted).
    """
    output_dir = cfg.output_dir or default_output_dir(name)
    cfg = dataclasses.replace(
        cfg, output_dir=output_dir, plugins=absolute_plugin_specs(cfg.plugins)
    )
    rundir = open_run_dir(output_dir, cfg.recover_mode, cfg.overwrite)
    try:
        return _run_in_dir(name, cfg, stop)
    finally:
        rundir.close()


def _run_in_dir(name: str, cfg: ExperimentConfig, stop: Callable[[], bool] | None) -> RunResult:
    from realflow.system.builtin_models import resolve_builtin_models
    from realflow.system.preflight import check_roles

    output_dir = cfg.output_dir
    found = latest_checkpoint(output_dir) if cfg.recover_mode != "disabled" else None
    if cfg.recover_mode == "resume" and found is None:
        raise RunDirError(
            f"recover_mode=resume: no complete checkpoint in {output_dir}/checkpoints to resume "
            "from; check output_dir, or use recover_mode=auto to start fresh when there is none"
        )
    if cfg.recover_mode == "auto" and found is None:
        logger.warning("recover_mode=auto: no checkpoint in %s; starting at step 1", output_dir)
    dfg = cfg.dfg()
    run_cfg = resolve_builtin_models(cfg)
    check_roles(run_cfg)  # before any worker starts: models and tokenizers fit together
    if uses_meshes(run_cfg.allocation):
        from realflow.system.mesh import check_mesh_layouts

        check_mesh_layouts(run_cfg, mesh_plan(run_cfg, dfg.mfcs))
    _write_run_files(cfg, dfg)
    first_step = 1
    # Rows of steps past the checkpoint run again (all of them when starting fresh).
    drop_rows_after(output_dir, found[0] if found else 0)
    if found:
        first_step = found[0] + 1
        run_cfg = resume_config(run_cfg, found[1])
        logger.info("resuming from %s (step %d)", found[1], found[0])
    where = placement(run_cfg, dfg)
    transport = make_transport(run_cfg)
    wait = True
    try:
        return _run_with(
            name, run_cfg, dfg, where, transport, first_step, found[1] if found else None, stop
        )
    except WorkerFailure as e:
        raise RunFailure(f"worker {e.worker}: {e}", e.traceback_text) from (e.cause or e)
    except CallbackError as e:
        raise RunFailure(str(e), e.traceback_text) from e
    except RunFailure as e:
        wait = not e.timed_out
        raise
    except Interrupted:
        wait = False
        raise
    finally:
        transport.shutdown(wait)


def _write_run_files(cfg: ExperimentConfig, dfg: DataflowGraph) -> None:
    from omegaconf import OmegaConf

    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    write_dfg_files(dfg, cfg.output_dir)


def _run_with(
    name: str,
    cfg: ExperimentConfig,
    dfg: DataflowGraph,
    where: dict[str, int],
    transport: Transport,
    first_step: int,
    resume_from: str | None,
    stop: Callable[[], bool] | None = None,
) -> RunResult:
    callbacks = CallbackList(
        build_callbacks(list(cfg.callbacks), dict(cfg.callback_args)),
        RunContext(name, cfg, cfg.output_dir),
    )
    eval_dfg = cfg.eval_dfg()
    specs = worker_specs(cfg, dfg, where, eval_dfg)
    transport.start(specs)
    workers = list(range(len(specs)))
    t0 = time.time()
    info = setup_info(transport.call_all(workers, Kind.SETUP))
    if resume_from:
        transport.call_all(workers, Kind.LOAD, resume_from)
    logger.info("%d worker(s) ready in %.1f s: %s", len(specs), time.time() - t0, where)
    for w, spec in enumerate(specs):
        logger.info("worker %d on %s: %s", w, transport.devices[w], ", ".join(spec.roles))
    loop = _Loop(cfg, dfg, transport, specs, where, callbacks, resume_from, first_step)
    if eval_dfg is not None:
        n = info.get("eval_batches", 0)
        sizes = batch_sizes(info.get("eval_rows", 0), cfg.eval_dataset.n_seqs or cfg.n_seqs, n)
        loop.evaluation = Evaluation(
            eval_dfg, transport, where, loop.master.data_worker, loop.tracer,
            cfg.eval_freq_steps, cfg.total_steps, n, sizes, cfg.mfc_timeout_s,
        )  # fmt: skip
    callbacks.run_start()
    signalled = lambda: stop is not None and stop()  # noqa: E731
    try:
        last_step = loop.master.run(
            first_step,
            cfg.total_steps,
            loop.step_end,
            loop.barrier_after,
            loop.at_barrier,
            lambda: signalled() or callbacks.ctx.stop_requested,
        )
    finally:
        loop.metrics.close()
        loop.tracer.write()
    rows = loop.metrics.read_rows()
    logger.info("finished %s in %.1f s\n%s", name, time.time() - t0, loop.metrics.summary(rows))
    if callbacks.ctx.stop_requested and not signalled():
        logger.info("stopped after step %d: %s", last_step, callbacks.ctx.stop_reason)
    interrupted = loop.master.stopped and signalled()
    result = RunResult(
        cfg.output_dir,
        rows,
        loop.last_checkpoint,
        last_step,
        interrupted,
        interrupted and last_step >= first_step and cfg.save_on_interrupt,
        callbacks.ctx.stop_reason,
    )
    callbacks.run_end(result)
    return result


class _Loop:
    """What the master calls back into during a run: step ends (metrics, trace, callbacks) and
    checkpoints."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        dfg: DataflowGraph,
        transport: Transport,
        specs: list[WorkerSpec],
        where: dict[str, int],
        callbacks: CallbackList,
        resume_from: str | None,
        first_step: int,
    ):
        self.cfg = cfg
        self.transport = transport
        self.workers = list(range(len(specs)))
        self.callbacks = callbacks
        self.last_checkpoint = resume_from
        self.evaluation: Evaluation | None = None
        self.pending_row: tuple[int, dict[str, dict[str, float]], float] | None = None
        self.order = [m.name for m in dfg.mfcs]
        names = {w: f"worker {w} ({', '.join(s.roles)})" for w, s in enumerate(specs)}
        self.tracer = Tracer(os.path.join(cfg.output_dir, "trace.json"), names)
        self.metrics = MetricsWriter(
            cfg.output_dir,
            cfg.total_steps - first_step + 1,
            cfg.tensorboard,
            cfg.progress_bar,
            [m.name for m in dfg.mfcs if m.is_train],
        )
        data_worker = specs[[s.serves_dataset for s in specs].index(True)].index
        self.master = Master(
            dfg,
            transport,
            where,
            data_worker,
            cfg.mfc_timeout_s,
            on_call=lambda r: self.tracer.record(r, dfg.mfc(r.mfc).n_seqs),
            weight_copies=cfg.weight_copies(),
            max_staleness=cfg.max_staleness(),
            mesh_plan=mesh_plan(cfg, dfg.mfcs) if uses_meshes(cfg.allocation) else None,
            on_realloc=self.tracer.record_realloc,
        )

    def step_end(self, step: int, stats: dict[str, dict[str, float]], step_s: float) -> None:
        if self.evaluation is not None and self.evaluation.due(step):
            self.pending_row = (step, stats, step_s)  # written after the evaluation
            return
        self._write_row(step, stats, step_s, {})

    def _write_row(
        self,
        step: int,
        stats: dict[str, dict[str, float]],
        step_s: float,
        eval_stats: dict[str, float],
    ) -> None:
        row = self.metrics.write(step, stats, step_s, self.order, eval_stats)
        self.callbacks.step_end(step, row)

    def barrier_after(self, step: int) -> bool:
        """Whether to stop at the end of `step` (nothing in flight) to evaluate or save."""
        return self.save_due(step) or (self.evaluation is not None and self.evaluation.due(step))

    def save_due(self, step: int) -> bool:
        if self.master.stopped and step == self.master.last_step:
            # A run a callback ends is saved like any finished run; a signal asks first.
            return self.cfg.save_on_interrupt or self.callbacks.ctx.stop_requested
        freq = self.cfg.save_freq_steps
        return step == self.cfg.total_steps or (freq > 0 and step % freq == 0)

    def at_barrier(self, step: int) -> None:
        if self.pending_row is not None and self.pending_row[0] == step:
            assert self.evaluation is not None
            eval_stats = self.evaluation.run(step)
            self.callbacks.evaluate(step, {"step": step, **eval_stats})
            self._write_row(*self.pending_row, eval_stats)
            self.pending_row = None
        if self.save_due(step):
            self.save(step)

    def save(self, step: int) -> None:
        # Every worker saves (and on resume loads) its state file: interface state and RNG too.
        start = time.time()
        self.last_checkpoint = write_checkpoint(
            self.cfg.output_dir,
            step,
            lambda d: self.transport.call_all(self.workers, Kind.SAVE, d),
            self.cfg.keep_last_n_checkpoints,
        )
        self.tracer.record_save(step, start, time.time())
        logger.info("saved %s", self.last_checkpoint)
        self.callbacks.save(step, self.last_checkpoint)
