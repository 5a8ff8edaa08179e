"""Config pieces every experiment shares: run settings, model roles, the dataset.

An experiment config is a dataclass subclassing `ExperimentConfig` that says which models it
uses (`roles()`), which dataset type it reads (`dataset_type`), and which MFCs make up one
iteration (`mfcs()`). Register it in `realflow.api.registry.EXPERIMENTS` to run it by name.
"""

from __future__ import annotations

import copy
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
from realflow.engines.config import EngineConfig, OptimizerConfig


@dataclasses.dataclass
class ModelConfig:
    """One model role (actor, critic, ref, rew...)."""

    path: str = field_(
        "builtin:tiny",
        "An HF model directory, or a built-in model: 'builtin:tiny' (random init) or "
        "'builtin:<task>-sft' (realflow's own SFT checkpoint on a built-in task, made on first "
        "use). Empty: same as actor.path (and actor.tokenizer_path) for roles that read the actor's "
        "tokens, such as ref and critic (a critic then starts from the actor with a fresh value "
        "head); a reward model has no default.",
    )
    tokenizer_path: str = field_(
        "",
        "Tokenizer directory or 'builtin'; empty: the model's own (weightless roles: the actor's).",
    )
    check_tokenizer: bool = field_(
        True,
        "Refuse to start when this role's tokenizer differs from the actor's (vocabulary, BOS, "
        "EOS). false: skip that check, for tokenizers whose ids you know mean the same tokens.",
    )
    init_from_actor: bool = field_(
        False, "Critic/reward roles: start from a causal-LM checkpoint with a fresh value head."
    )
    backend: str = field_("torch", "Training backend.", choices=("torch", "deepspeed"))
    zero_stage: int = field_(2, "deepspeed ZeRO stage (backend=deepspeed).", choices=(0, 1, 2, 3))
    bf16: bool = field_(False, "bf16 autocast for this model's calls.")
    offload: bool = field_(False, "Offload weights between calls (roles never trained).")
    gradient_checkpointing: bool = field_(False, "Recompute activations in backward.")
    max_tokens_per_mb: int = field_(4096, "Token budget of one micro-batch.", gt=0)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            backend=self.backend, zero_stage=self.zero_stage, bf16=self.bf16, offload=self.offload
        )


# A role path that means "the actor's model" (see ModelConfig.path and with_role_defaults).
SAME_AS_ACTOR = ""


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

    def with_role_defaults(self) -> ExperimentConfig:
        """A copy whose roles that follow the actor say so explicitly. The one place role
        defaults are resolved (the runner resolves them before any worker starts):

        - a role with weights and an empty path (SAME_AS_ACTOR) takes actor.path and
          actor.tokenizer_path; a critic or reward head built that way starts from the actor's
          body with a fresh head (init_from_actor). A reward model is trained separately, so an
          empty rew.path stays empty, for the preflight check to refuse;
        - a weightless role (head 'none') without a tokenizer_path decodes with the actor's
          tokenizer ('builtin' for built-in models; 'builtin' when there is no actor).
        """
        cfg = copy.deepcopy(self)
        roles = cfg.roles()
        actor = roles.get("actor")
        for name, role in roles.items():
            c = role.config
            if role.head == "none":
                if not c.tokenizer_path:
                    c.tokenizer_path = tokenizer_source(actor.config) if actor else "builtin"
                continue
            if c.path != SAME_AS_ACTOR or actor is None or name == "actor":
                continue
            if role.head == "reward" or actor.config.path == SAME_AS_ACTOR:
                continue
            c.path = actor.config.path
            c.tokenizer_path = c.tokenizer_path or actor.config.tokenizer_path
            if role.head != "lm":
                c.init_from_actor = True
        return cfg

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


def tokenizer_source(model: ModelConfig) -> str:
    """Where a role's tokenizer comes from: tokenizer_path, 'builtin' (built-in models) or the
    model directory."""
    source = model.tokenizer_path or model.path
    return "builtin" if source.startswith("builtin:") else source


def interface_args(cfg: Any) -> dict[str, Any]:
    """A hyperparameter dataclass as plain interface keyword arguments."""
    return dataclasses.asdict(cfg)
