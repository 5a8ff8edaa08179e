"""Config pieces every experiment shares: run settings, model roles, the dataset.

An experiment config is a dataclass subclassing `ExperimentConfig` that says which models it
uses (`roles()`), which dataset type it reads (`dataset_type`), and which MFCs make up one
iteration (`mfcs()`). Register it in `realflow.api.registry.EXPERIMENTS` to run it by name.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, ClassVar

from realflow.api.config import field_
from realflow.api.dfg import (
    DataflowGraph,
    InterfaceSpec,
    InterfaceType,
    MFCDef,
    MicroBatchSpec,
    build_dfg,
)
from realflow.engines.config import SAVE_DTYPES, EngineConfig, OptimizerConfig


@dataclasses.dataclass
class ModelConfig:
    """One model role (actor, critic, ref, rew...)."""

    path: str = field_(
        "builtin:tiny",
        "An HF model directory, or a built-in model: 'builtin:tiny' (random init) or "
        "'builtin:<task>-sft' (realflow's own SFT checkpoint on a built-in task, made on first use).",
    )
    tokenizer_path: str = field_("", "Tokenizer directory or 'builtin'; empty: the model's own.")
    init_from_actor: bool = field_(
        False, "Critic/reward roles: start from a causal-LM checkpoint with a fresh value head."
    )
    backend: str = field_("torch", "Training backend.", choices=("torch", "deepspeed"))
    zero_stage: int = field_(2, "deepspeed ZeRO stage (backend=deepspeed).", choices=(0, 1, 2, 3))
    bf16: bool = field_(
        False,
        "bf16 compute. Trained roles keep fp32 master weights and optimizer state whatever the "
        "checkpoint's dtype (torch: autocast; deepspeed: bf16 weight copies). Roles never "
        "trained keep the checkpoint's dtype with bf16, and are upcast to fp32 without it.",
    )
    offload: bool = field_(
        False,
        "Move weights (and a trained role's optimizer state) to CPU between calls; nothing "
        "moves on CPU. Not supported with backend=deepspeed.",
    )
    gradient_checkpointing: bool = field_(False, "Recompute activations in backward.")
    max_tokens_per_mb: int = field_(4096, "Token budget of one micro-batch.", gt=0)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    save_dtype: str = field_(
        "auto",
        "dtype of the saved HF weights of a trained role: auto (the checkpoint's), float32, "
        "bfloat16 or float16. Below float32 the fp32 master weights also go into the "
        "checkpoint's worker state, so resume stays exact.",
        choices=SAVE_DTYPES,
    )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            backend=self.backend,
            zero_stage=self.zero_stage,
            bf16=self.bf16,
            offload=self.offload,
            save_dtype=self.save_dtype,
        )

    def validate(self) -> list[str]:
        # Checked for every role: a role never trained does not use the backend.
        return self.engine_config().train_problems()


def model_field(path: str = "builtin:tiny", lr: float = 2e-5, **kwargs: Any) -> Any:
    """A ModelConfig field with its own defaults. The built-in experiments' learning rates are
    tuned for the built-in tiny default; set `<role>.optimizer.lr` for real models."""

    def make() -> ModelConfig:
        return ModelConfig(path=path, optimizer=OptimizerConfig(lr=lr), **kwargs)

    return dataclasses.field(default_factory=make)


@dataclasses.dataclass
class DatasetConfig:
    """Where samples come from."""

    path: str = field_("builtin:reverse", "A JSONL file, or a built-in dataset 'builtin:<task>'.")
    max_length: int = field_(256, "Longest tokenized row, in tokens.", gt=0)
    truncate: bool = field_(False, "Truncate rows over max_length instead of dropping them.")
    skip_bad_rows: bool = field_(False, "Skip (and count) malformed rows instead of failing.")
    shuffle: bool = field_(True, "Shuffle rows each epoch.")


@dataclasses.dataclass
class ModelRole:
    """What an experiment needs of one role: its config and the head it carries."""

    config: ModelConfig
    head: str  # "lm" | "critic" | "reward" | "none" (no weights: e.g. a rule-based scorer)


@dataclasses.dataclass
class ExperimentConfig:
    """Settings of every run. Subclasses add roles, a dataset and hyperparameters."""

    output_dir: str = field_("", "Run directory; empty: runs/<experiment>/<date-time>.")
    seed: int = field_(1, "Seed of every random choice of the run.")
    mode: str = field_("local", "Where workers run.", choices=("local", "ray"))
    ray_address: str = field_("", "mode=ray: address of a running Ray cluster; empty starts one.")
    ray_dashboard: bool = field_(False, "mode=ray: start the Ray dashboard with a new cluster.")
    total_steps: int = field_(20, "Iterations (steps) to run.", gt=0)
    n_seqs: int = field_(16, "Samples (prompts or pairs) per step.", gt=0)
    save_freq_steps: int = field_(0, "Save a checkpoint every N steps (0: only at the end).", ge=0)
    recover_mode: str = field_(
        "disabled",
        "'auto' resumes from the last checkpoint in output_dir.",
        choices=("disabled", "auto"),
    )
    mfc_timeout_s: float = field_(0.0, "Fail a model call that runs longer (0: no limit).", ge=0.0)
    allocation: dict[str, int] = field_(
        {}, "Role -> worker index; roles on one index share a worker. Empty: a worker per role."
    )
    plugins: list[str] = field_(
        [], "Python files or modules imported first (they register things)."
    )
    tensorboard: bool = field_(True, "Write tensorboard events to output_dir.")
    progress_bar: bool = field_(True, "Show a progress bar with the latest metrics.")
    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)

    # ---- what subclasses define -------------------------------------------------------------

    # Class attributes, not config keys: the dataset type (a name in DATASETS) and the keys its
    # samples carry.
    dataset_type = "prompt"
    dataset_keys: ClassVar[tuple[str, ...]] = ("packed_prompts",)

    def roles(self) -> dict[str, ModelRole]:
        raise NotImplementedError

    def mfcs(self) -> list[MFCDef]:
        raise NotImplementedError

    # ---- derived ------------------------------------------------------------------------------

    def dfg(self) -> DataflowGraph:
        return build_dfg(self.mfcs(), self.dataset_keys)

    def divides_n_seqs(self, key: str, n_minibatches: int) -> list[str]:
        """The problem, if any, with a minibatch count that must split the batch evenly."""
        if n_minibatches > 0 and self.n_seqs % n_minibatches:
            return [f"{key} ({n_minibatches}) must divide n_seqs ({self.n_seqs})"]
        return []

    def optimizer_steps_per_train_call(self) -> int:
        """Optimizer steps one train_step MFC takes (sizes the LR schedule)."""
        return 1

    def node(
        self,
        name: str,
        role: str,
        kind: InterfaceType,
        impl: str,
        args: dict[str, Any] | None = None,
        inputs: tuple[str, ...] = (),
        outputs: tuple[str, ...] = (),
        output_key_remap: dict[str, str] | None = None,
    ) -> MFCDef:
        """One MFC over this run's `n_seqs` samples with the role's micro-batch budget."""
        return MFCDef(
            name=name,
            model_name=role,
            interface_type=kind,
            interface_impl=InterfaceSpec(impl, dict(args or {})),
            n_seqs=self.n_seqs,
            input_keys=inputs,
            output_keys=outputs,
            output_key_remap=dict(output_key_remap or {}),
            mb_spec=self.mb_spec(role),
        )

    def mb_spec(self, role: str) -> MicroBatchSpec:
        return MicroBatchSpec(
            n_mbs=1, max_tokens_per_mb=self.roles()[role].config.max_tokens_per_mb
        )

    def resolved_output_dir(self, experiment: str) -> str:
        if self.output_dir:
            return self.output_dir
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return os.path.join("runs", experiment, stamp)

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not self.allocation:
            return problems
        roles = self.roles()  # only when needed: roles() may look up scorers (imports torch)
        for role in self.allocation:
            if role not in roles:
                problems.append(f"allocation: unknown role '{role}'; roles are {', '.join(roles)}")
        for role, index in self.allocation.items():
            if index < 0:
                problems.append(f"allocation.{role}: worker index ({index}) must be >= 0")
        return problems


def interface_args(cfg: Any) -> dict[str, Any]:
    """A hyperparameter dataclass as plain interface keyword arguments."""
    return dataclasses.asdict(cfg)
