"""Built-in model names in role paths, resolved before workers start.

- `builtin:tiny`: a random-init tiny llama (built on the worker, no files);
- `builtin:<task>-sft`: realflow's own SFT checkpoint of `builtin:tiny` on the built-in task
  `<task>`, trained on first use with the `sft` experiment and cached under
  `$REALFLOW_CACHE` (default ~/.cache/realflow). The PPO and GRPO defaults start from it.
"""

from __future__ import annotations

import logging
import os
import shutil

from realflow.experiments.common import ExperimentConfig

logger = logging.getLogger(__name__)

SFT_RECIPE_VERSION = 3  # 2: the built-in tokenizer adds <s> itself; 3: it has a chat template
# Short on purpose: the default RL runs need a policy that is right only part of the time.
SFT_STEPS = 100


def cache_dir() -> str:
    return os.environ.get(
        "REALFLOW_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "realflow")
    )


def builtin_sft_path(task: str) -> str:
    """The cached `builtin:<task>-sft` checkpoint, trained now if missing."""
    from realflow.data.tasks import TASKS

    if task not in TASKS and task != "mix":
        raise ValueError(
            f"unknown built-in model 'builtin:{task}-sft'; tasks: {', '.join(sorted(TASKS))}, mix"
        )
    target = os.path.join(cache_dir(), "models", f"{task}-sft-v{SFT_RECIPE_VERSION}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    from realflow.experiments.sft import SFTConfig
    from realflow.system.runner import run

    work = f"{target}.work-{os.getpid()}"
    logger.info("training built-in model builtin:%s-sft (first use; cached in %s)", task, target)
    cfg = SFTConfig(
        output_dir=work,
        total_steps=SFT_STEPS,
        n_seqs=32,
        seed=7,
        tensorboard=False,
        progress_bar=False,
    )
    cfg.dataset.path = f"builtin:{task}"
    cfg.actor.optimizer.lr = 3e-3
    cfg.actor.optimizer.warmup_steps_proportion = 0.05
    result = run("sft", cfg)
    assert result.last_checkpoint is not None
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(os.path.join(result.last_checkpoint, "actor"), target)
    except OSError:
        if not os.path.isfile(os.path.join(target, "config.json")):  # not another process's win
            raise
    shutil.rmtree(work, ignore_errors=True)
    return target


def resolve_builtin_models(cfg: ExperimentConfig) -> ExperimentConfig:
    """A copy of `cfg` with its role defaults resolved (`ExperimentConfig.with_role_defaults`:
    ref and critic follow the actor, weightless roles use the actor's tokenizer) and a directory
    for every `builtin:<task>-sft`."""
    cfg = cfg.with_role_defaults()
    for role in cfg.roles().values():
        path = role.config.path
        if path.startswith("builtin:") and path.endswith("-sft"):
            role.config.path = builtin_sft_path(path[len("builtin:") : -len("-sft")])
    return cfg
