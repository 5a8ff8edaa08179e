"""Running an experiment: run directory, workers, master loop, checkpoints, resume, failures."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import time
from typing import Any

from realflow.api.config import to_dict
from realflow.api.dfg import DataflowGraph, write_dfg_files
from realflow.experiments.common import ExperimentConfig
from realflow.system.checkpoint import latest_checkpoint, write_checkpoint
from realflow.system.master import Master, RunFailure
from realflow.system.observe import MetricsWriter, Tracer, drop_rows_after
from realflow.system.transport import Transport, WorkerFailure
from realflow.system.worker import Kind, WorkerSpec

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    output_dir: str
    rows: list[dict[str, Any]]
    last_checkpoint: str | None


def placement(cfg: ExperimentConfig, dfg: DataflowGraph) -> dict[str, int]:
    """Role -> worker index: `cfg.allocation`, or one worker per role in DFG order."""
    roles = list(dict.fromkeys(m.model_name for m in dfg.mfcs))
    if cfg.allocation:
        missing = [r for r in roles if r not in cfg.allocation]
        if missing:
            raise ValueError(f"allocation names no worker for roles {missing}; give every role one")
        used = sorted(set(cfg.allocation[r] for r in roles))
        renumber = {w: i for i, w in enumerate(used)}
        return {r: renumber[cfg.allocation[r]] for r in roles}
    return {r: i for i, r in enumerate(roles)}


def worker_specs(
    cfg: ExperimentConfig, dfg: DataflowGraph, where: dict[str, int]
) -> list[WorkerSpec]:
    trained = {m.model_name for m in dfg.mfcs if m.is_train}
    source_role = dfg.mfc(dfg.sources()[0]).model_name
    n_workers = max(where.values()) + 1
    specs = []
    for w in range(n_workers):
        roles = [r for r, i in where.items() if i == w]
        specs.append(
            WorkerSpec(
                index=w,
                config=cfg,
                roles=roles,
                trained_roles=[r for r in roles if r in trained],
                mfcs=[m for m in dfg.mfcs if where[m.model_name] == w],
                serves_dataset=where[source_role] == w,
                total_train_steps=max(1, cfg.total_steps * cfg.optimizer_steps_per_train_call()),
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
    """The config with each trained role loading its weights from checkpoint `ckpt`."""
    cfg = copy.deepcopy(cfg)
    for role, spec in cfg.roles().items():
        path = os.path.join(ckpt, role)
        if os.path.isdir(path):
            spec.config.path = path
            spec.config.init_from_actor = False
    return cfg


def run_experiment(name: str, cfg: ExperimentConfig) -> int:
    """The CLI's entry: run, print the summary; 0 on success, 1 on a failed run."""
    try:
        result = run(name, cfg)
    except RunFailure as e:
        logger.error("run failed: %s", e)
        print(f"error: run failed: {e}", file=sys.stderr)
        return 1
    print(f"run directory: {result.output_dir}")
    return 0


def run(name: str, cfg: ExperimentConfig) -> RunResult:
    """Run experiment `name` with `cfg`; raises RunFailure when a call fails."""
    from realflow.system.builtin_models import resolve_builtin_models
    from realflow.system.preflight import check_roles

    output_dir = cfg.resolved_output_dir(name)
    cfg = dataclasses.replace(cfg, output_dir=output_dir)
    os.makedirs(output_dir, exist_ok=True)
    dfg = cfg.dfg()
    _write_run_files(cfg, dfg)
    first_step = 1
    found = latest_checkpoint(output_dir) if cfg.recover_mode == "auto" else None
    run_cfg = resolve_builtin_models(cfg)
    check_roles(run_cfg)  # before any worker starts: models and tokenizers fit together
    if found:
        first_step = found[0] + 1
        run_cfg = resume_config(run_cfg, found[1])
        drop_rows_after(output_dir, found[0])  # steps past the checkpoint run again
        logger.info("resuming from %s (step %d)", found[1], found[0])
    elif cfg.recover_mode != "auto" and os.path.exists(os.path.join(output_dir, "metrics.jsonl")):
        os.remove(os.path.join(output_dir, "metrics.jsonl"))
    where = placement(run_cfg, dfg)
    transport = make_transport(run_cfg)
    try:
        return _run_with(
            name, run_cfg, dfg, where, transport, first_step, found[1] if found else None
        )
    except WorkerFailure as e:
        raise RunFailure(f"worker {e.worker}: {e}") from (e.cause or e)
    finally:
        transport.shutdown()


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
) -> RunResult:
    specs = worker_specs(cfg, dfg, where)
    transport.start(specs)
    workers = list(range(len(specs)))
    t0 = time.time()
    transport.call_all(workers, Kind.SETUP)
    if resume_from:
        transport.call_all(workers, Kind.LOAD, resume_from)
    logger.info("%d worker(s) ready in %.1f s: %s", len(specs), time.time() - t0, where)

    names = {w: f"worker {w} ({', '.join(s.roles)})" for w, s in enumerate(specs)}
    tracer = Tracer(os.path.join(cfg.output_dir, "trace.json"), names)
    train_order = [m.name for m in dfg.mfcs if m.is_train]
    metrics = MetricsWriter(
        cfg.output_dir,
        cfg.total_steps - first_step + 1,
        cfg.tensorboard,
        cfg.progress_bar,
        train_order,
    )
    master = Master(
        dfg,
        transport,
        where,
        specs[[s.serves_dataset for s in specs].index(True)].index,
        cfg.mfc_timeout_s,
        on_call=lambda r: tracer.record(r, dfg.mfc(r.mfc).n_seqs),
    )
    last_ckpt = [resume_from]
    # Every worker saves (and on resume loads) its state file: interface state and RNG too.
    save_workers = workers

    def save(step: int) -> None:
        last_ckpt[0] = write_checkpoint(
            cfg.output_dir, step, lambda d: transport.call_all(save_workers, Kind.SAVE, d)
        )
        logger.info("saved %s", last_ckpt[0])

    def save_after(step: int) -> bool:
        freq = cfg.save_freq_steps
        return step == cfg.total_steps or (freq > 0 and step % freq == 0)

    order = [m.name for m in dfg.mfcs]
    try:
        master.run(
            first_step,
            cfg.total_steps,
            lambda s, stats, dt: metrics.write(s, stats, dt, order),
            save_after,
            save,
        )
    finally:
        metrics.close()
        tracer.write()
    logger.info("finished %s in %.1f s\n%s", name, time.time() - t0, metrics.summary())
    return RunResult(cfg.output_dir, metrics.rows, last_ckpt[0])
