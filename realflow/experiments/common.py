"""Config pieces every experiment shares: run settings, model roles, the dataset.

An experiment config is a dataclass subclassing `ExperimentConfig` that says which models it
uses (`roles()`), which dataset type it reads (`dataset_type`), and which MFCs make up one
iteration (`mfcs()`). Register it in `realflow.api.registry.EXPERIMENTS` to run it by name.
"""

from __future__ import annotations

import copy
import dataclasses
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
from realflow.engines.config import (
    SAVE_DTYPES,
    AdapterSpec,
    EngineConfig,
    LoraSettings,
    OptimizerConfig,
    PeftSettings,
    adapter_problems,
    adapter_spec,
)
from realflow.experiments.allocation import mesh_problems, uses_meshes


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
    bf16: bool | None = field_(
        None,
        "bf16 compute; unset: true on a GPU, false on CPU. Trained roles keep fp32 master "
        "weights and optimizer state whatever the checkpoint's dtype (torch: autocast; "
        "deepspeed: bf16 weight copies). Roles never trained are held in bf16 on a GPU (the "
        "checkpoint's dtype on CPU) with bf16, and are upcast to fp32 without it.",
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

    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    peft: PeftSettings = dataclasses.field(default_factory=PeftSettings)
    save_merged: bool = field_(
        False,
        "Roles with adapters (lora/peft): also save the merged HF model under "
        "<checkpoint>/<role>/merged (the adapter itself is always saved).",
    )
    generate_merged: bool = field_(
        True,
        "Roles with adapters: generate with the adapters merged into a temporary copy of the "
        "adapted weights (plain nn.Linear decoding, docs/tuners.md); false: through the "
        "adapter layers.",
    )
    base_of: str = field_(
        "",
        "Run this role as another role's base weights with its adapters disabled (e.g. "
        "ref.base_of=actor for an actor with lora.rank > 0): no second copy of the weights; "
        "both roles go on one worker.",
    )

    def resolved_bf16(self, device_type: str) -> bool:
        """`bf16` on a device of this type: unset means true on CUDA, false elsewhere."""
        return device_type == "cuda" if self.bf16 is None else self.bf16

    def engine_config(self, device_type: str = "cpu") -> EngineConfig:
        return EngineConfig(
            backend=self.backend,
            zero_stage=self.zero_stage,
            bf16=self.resolved_bf16(device_type),
            offload=self.offload,
            save_dtype=self.save_dtype,
            generate_merged=self.generate_merged,
            save_merged=self.save_merged,
        )

    def adapters(self) -> AdapterSpec | None:
        """The adapters this role trains (None: all its weights)."""
        return adapter_spec(self.lora, self.peft)

    def validate(self) -> list[str]:
        # Checked for every role: a role never trained does not use the backend.
        problems = self.engine_config().train_problems() + adapter_problems(self.lora, self.peft)
        if self.base_of and self.adapters() is not None:
            problems.append(
                f"base_of ({self.base_of!r}) runs this role on {self.base_of}'s base weights; "
                "it cannot have adapters of its own (lora.rank / peft.method)"
            )
        if self.base_of and self.offload:
            problems.append(
                f"offload: a role with base_of ({self.base_of!r}) uses {self.base_of}'s engine; "
                f"set {self.base_of}.offload instead"
            )
        return problems


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
    args: dict[str, Any] = field_(
        {},
        "Keyword arguments of the dataset class: chat_template=<file.jinja or template text> "
        "for conversations, n_rows / seed for 'builtin:' sources, or your own dataset's.",
    )

    def validate(self) -> list[str]:
        owned = {"max_length", "truncate", "skip_bad_rows"} & set(self.args)
        problems = [f"args.{k}: set dataset.{k} instead" for k in sorted(owned)]
        for k in sorted({"loss_scale", "loss_scale_args"} & set(self.args)):
            problems.append(f"args.{k}: set <experiment>.{k} (e.g. sft.{k}) instead")
        return problems


@dataclasses.dataclass
class EvalDatasetConfig:
    """What an evaluation reads."""

    path: str = field_(
        "",
        "A JSONL file or a built-in dataset; empty: the eval split of the built-in training "
        "task (builtin:<task>:eval).",
    )
    n_seqs: int = field_(0, "Samples per evaluation batch (0: n_seqs).", ge=0)
    max_batches: int = field_(0, "Batches per evaluation at most (0: the whole dataset).", ge=0)


@dataclasses.dataclass
class ModelRole:
    """What an experiment needs of one role: its config and the head it carries."""

    config: ModelConfig
    head: str  # "lm" | "critic" | "reward" | "none" (no weights: e.g. a rule-based scorer)


@dataclasses.dataclass
class ExperimentConfig:
    """Settings of every run. Subclasses add roles, a dataset and hyperparameters."""

    output_dir: str = field_(
        "",
        "Run directory (locked while a run uses it); empty: runs/<experiment>/<date-time>-<pid>.",
    )
    seed: int = field_(1, "Seed of every random choice of the run.")
    mode: str = field_("local", "Where workers run.", choices=("local", "ray"))
    ray_address: str = field_("", "mode=ray: address of a running Ray cluster; empty starts one.")
    ray_dashboard: bool = field_(False, "mode=ray: start the Ray dashboard with a new cluster.")
    device: str = field_(
        "auto",
        "Where workers compute: 'cuda' (mode=local: worker i on cuda:i modulo the GPU count; "
        "mode=ray: the GPU Ray assigns each worker), 'cpu', or 'auto' (cuda when the machine or "
        "Ray cluster has a GPU). cuda without a GPU is an error before anything starts.",
        choices=("auto", "cpu", "cuda"),
    )
    ray_gpus_per_worker: float = field_(
        -1.0,
        "mode=ray: GPUs each worker actor asks Ray for; -1: 1 with device cuda, 0 on CPU; "
        "a fraction (e.g. 0.5) lets workers share a GPU.",
    )
    total_steps: int = field_(20, "Iterations (steps) to run.", gt=0)
    n_seqs: int = field_(16, "Samples (prompts or pairs) per step.", gt=0)
    save_freq_steps: int = field_(0, "Save a checkpoint every N steps (0: only at the end).", ge=0)
    keep_last_n_checkpoints: int = field_(
        0, "Delete older checkpoints, keeping the newest N (0: keep all).", ge=0
    )
    save_on_interrupt: bool = field_(
        True, "On SIGINT/SIGTERM, finish the steps in flight and save a checkpoint."
    )
    recover_mode: str = field_(
        "disabled",
        "'auto': resume from the last checkpoint in output_dir, or start fresh when there is "
        "none; 'resume': resume, and fail when there is none; 'disabled': a fresh run (an "
        "output_dir holding a run is refused unless overwrite=true).",
        choices=("disabled", "auto", "resume"),
    )
    overwrite: bool = field_(
        False, "Start over in an output_dir holding a run: delete its metrics and checkpoints."
    )
    mfc_timeout_s: float = field_(0.0, "Fail a model call that runs longer (0: no limit).", ge=0.0)
    allocation: dict[str, Any] = field_(
        {},
        "Role -> worker index (roles on one index share a worker), or MFC (or role) -> "
        "<layout>@<workers> (e.g. allocation.actor_train=d2t1p1@0-1; docs/parallel.md). "
        "Empty: a worker per role.",
    )
    plugins: list[str] = field_(
        [], "Python files or modules imported first (they register things)."
    )
    metrics: list[str] = field_(
        ["generation", "scores"],
        "Metric functions (METRICS) run on every generate/inference call's outputs, logged "
        "as <mfc>/<stat>: 'generation' (answer lengths, EOS rate), 'scores' (stats of "
        "per-sequence outputs such as rewards), or your own.",
    )
    callbacks: list[str] = field_(
        [],
        "Callbacks (CALLBACKS) run in the driver on run events: 'early_stopping', "
        "'target_metric', or your own; arguments in callback_args.<name>.*.",
    )
    callback_args: dict[str, dict[str, Any]] = field_(
        {}, "Keyword arguments of each callback, e.g. callback_args.target_metric.value=0.6."
    )
    tensorboard: bool = field_(True, "Write tensorboard events to output_dir.")
    progress_bar: bool = field_(True, "Show a progress bar with the latest metrics.")
    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    eval_freq_steps: int = field_(
        0,
        "Run the experiment's evaluation graph after every N steps and after the last one, "
        "logged as eval/<stat> (0: never).",
        ge=0,
    )
    eval_dataset: EvalDatasetConfig = dataclasses.field(default_factory=EvalDatasetConfig)
    evaluator: str = field_(
        "",
        "An interface (INTERFACES) whose evaluate() replaces the evaluation graph's own "
        "evaluate calls; empty: the experiment's.",
    )
    evaluator_args: dict[str, Any] = field_({}, "Keyword arguments of `evaluator`.")

    # ---- what subclasses define -------------------------------------------------------------

    # Class attributes, not config keys: the dataset type (a name in DATASETS) and the keys its
    # samples carry.
    dataset_type = "prompt"
    dataset_keys: ClassVar[tuple[str, ...]] = ("packed_prompts",)

    def roles(self) -> dict[str, ModelRole]:
        raise NotImplementedError

    def dataset_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the dataset class, after the path and the tokenizer."""
        d = self.dataset
        owned = {"max_length": d.max_length, "truncate": d.truncate}
        return {**owned, "skip_bad_rows": d.skip_bad_rows, **d.args}

    def build_dataset(self, tokenizer: Any, path: str | None = None) -> Any:
        """The run's dataset (or, with `path`, another file read the same way, e.g. the eval
        split): `DATASETS[dataset_type](path or dataset.path, tokenizer, **dataset_kwargs())`."""
        from realflow.api.registry import DATASETS

        cls = DATASETS.get(self.dataset_type)
        return cls(path or self.dataset.path, tokenizer, **self.dataset_kwargs())

    def mfcs(self) -> list[MFCDef]:
        raise NotImplementedError

    def eval_mfcs(self) -> list[MFCDef]:
        """The evaluation graph: by default the training graph with every train_step turned
        into an evaluate call of the same interface (a loss, an accuracy), named
        `eval_<model>`, and the other calls named `eval_<name>`. RL experiments override it
        (greedy answers, then their reward)."""
        out = []
        for mfc in self.mfcs():
            if mfc.is_train:
                name, kind = f"eval_{mfc.model_name}", InterfaceType.EVALUATE
            else:
                name, kind = f"eval_{mfc.name}", mfc.interface_type
            out.append(dataclasses.replace(mfc, name=name, interface_type=kind))
        return out

    # ---- derived ------------------------------------------------------------------------------

    def dfg(self) -> DataflowGraph:
        return build_dfg(self.mfcs(), self.dataset_keys)

    def eval_dfg(self) -> DataflowGraph | None:
        """The evaluation graph (with `evaluator` swapped in), or None when evaluation is off."""
        if self.eval_freq_steps <= 0:
            return None
        mfcs = self.eval_mfcs()
        if self.evaluator:
            spec = InterfaceSpec(self.evaluator, dict(self.evaluator_args))
            mfcs = [
                dataclasses.replace(m, interface_impl=spec)
                if m.interface_type == InterfaceType.EVALUATE
                else m
                for m in mfcs
            ]
        return build_dfg(mfcs, self.dataset_keys)

    def eval_dataset_path(self) -> str:
        """`eval_dataset.path`, or the eval split of a built-in training task."""
        if self.eval_dataset.path:
            return self.eval_dataset.path
        if self.dataset.path.startswith("builtin:"):
            task = self.dataset.path[len("builtin:") :].split(":")[0]
            return f"builtin:{task}:eval"
        raise ValueError(
            f"eval_dataset.path: evaluation needs a dataset; dataset.path ({self.dataset.path}) "
            "is not a built-in task with an eval split, so give eval_dataset.path"
        )

    def divides_n_seqs(self, key: str, n_minibatches: int) -> list[str]:
        """The problem, if any, with a minibatch count that must split the batch evenly."""
        if n_minibatches > 0 and self.n_seqs % n_minibatches:
            return [f"{key} ({n_minibatches}) must divide n_seqs ({self.n_seqs})"]
        return []

    def optimizer_steps_per_train_call(self) -> int:
        """Optimizer steps one train_step MFC takes (sizes the LR schedule)."""
        return 1

    def weight_copies(self) -> dict[str, str]:
        """Roles that hold a copy of a trained role's weights, copy -> trained role (e.g. a
        generation copy of the actor on its own worker). The master sends the trained role's
        weights to each copy after every train_step of it; none by default."""
        return {}

    def max_staleness(self) -> int:
        """How many train steps the weights of a copy may lag behind the step that reads its
        outputs (see realflow.system.master); 0: none."""
        return 0

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

    def _eval_problems(self) -> list[str]:
        if self.eval_freq_steps <= 0:
            return []
        problems = []
        if not self.eval_mfcs():
            problems.append(
                f"eval_freq_steps: {type(self).__name__} has no evaluation graph (eval_mfcs)"
            )
        if not any(m.interface_type == InterfaceType.EVALUATE for m in self.eval_mfcs()) and (
            self.evaluator
        ):
            problems.append("evaluator: the evaluation graph has no evaluate call to replace")
        try:
            self.eval_dataset_path()
        except ValueError as e:
            problems.append(str(e))
        return problems

    def _device_problems(self) -> list[str]:
        gpus = self.ray_gpus_per_worker
        if gpus != -1 and gpus < 0:
            return [f"ray_gpus_per_worker ({gpus}) must be -1 (automatic) or >= 0"]
        if self.device == "cpu" and gpus > 0:
            return [f"ray_gpus_per_worker ({gpus}) must be 0 or -1 with device=cpu"]
        if self.device == "cuda" and gpus == 0:
            return [
                "ray_gpus_per_worker (0) must be > 0 with device=cuda: a worker with no GPU "
                "cannot own one; use -1 (one GPU each) or a fraction to share"
            ]
        return []

    def _base_of_problems(self) -> list[str]:
        """`<role>.base_of=<owner>`: the owner is a trained role with adapters, computing in the
        same precision, and (with an explicit allocation) on the same worker."""
        fields = {f.name for f in dataclasses.fields(self)}
        sharing = {
            name: getattr(self, name)
            for name in fields
            if isinstance(getattr(self, name), ModelConfig) and getattr(self, name).base_of
        }
        if not sharing:
            return []
        roles = self.roles()
        trained = {m.model_name for m in self.mfcs() if m.is_train}
        problems = []
        for name, cfg in sharing.items():
            owner = cfg.base_of
            where = f"{name}.base_of ({owner!r})"
            if name not in roles:
                problems.append(
                    f"{where}: this run has no role {name} (roles: {', '.join(roles)}; e.g. "
                    "kl_beta=0 drops ref); leave base_of empty"
                )
                continue
            if owner not in roles or owner == name:
                problems.append(f"{where}: not another role; roles are {', '.join(roles)}")
                continue
            own = roles[owner].config
            if owner not in trained or own.adapters() is None:
                problems.append(
                    f"{where}: {owner} must be trained with adapters (set {owner}.lora.rank > 0 "
                    f"or {owner}.peft.method) for its base weights to stay fixed"
                )
            elif own.adapters().args.get("bias", "none") != "none":
                problems.append(
                    f"{where}: {owner}'s adapters train biases ({owner}.lora.bias="
                    f"{own.adapters().args['bias']!r}), which are base weights; use bias none"
                )
            if roles[name].head != roles[owner].head:
                heads = f"{name} has head {roles[name].head}, {owner} {roles[owner].head}"
                problems.append(f"{where}: {heads}")
            if cfg.bf16 != own.bf16:
                unset = "unset: true on a GPU, false on CPU"
                mine, theirs = (unset if v is None else v for v in (cfg.bf16, own.bf16))
                problems.append(
                    f"{where}: {name}.bf16 ({mine}) must equal {owner}.bf16 ({theirs}): "
                    f"{name} computes with {owner}'s engine"
                )
            default_path = getattr(type(self)(), name).path
            if cfg.path != own.path and cfg.path != default_path:
                problems.append(
                    f"{where}: {name}.path ({cfg.path}) must equal {owner}.path ({own.path}): "
                    f"{name} is {owner}'s base weights"
                )
            a = self.allocation
            if a and name in a and owner in a and a[name] != a[owner]:
                problems.append(
                    f"{where}: allocation puts {name} on worker {a[name]} and {owner} on "
                    f"{a[owner]}; they share weights, so give them one worker"
                )
        return problems

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

    def validate(self) -> list[str]:
        from realflow.api.callbacks import callback_problems
        from realflow.api.registry import METRICS

        problems: list[str] = [
            f"metrics: {METRICS.miss_message(m)}" for m in self.metrics if m not in METRICS
        ]
        problems += callback_problems(list(self.callbacks), dict(self.callback_args))
        problems += self._eval_problems()
        problems += self._device_problems()
        if self.overwrite and self.recover_mode != "disabled":
            problems.append(
                f"overwrite=true deletes the run that recover_mode={self.recover_mode} would "
                "resume; set one of them"
            )
        problems += self._base_of_problems()
        if not self.allocation:
            return problems
        if uses_meshes(self.allocation):
            return problems + mesh_problems(self, self.mfcs())
        roles = self.roles()  # only when needed: roles() may look up scorers (imports torch)
        for role in self.allocation:
            if role not in roles:
                problems.append(f"allocation: unknown role '{role}'; roles are {', '.join(roles)}")
        for role, index in self.allocation.items():
            if index < 0:
                problems.append(f"allocation.{role}: worker index ({index}) must be >= 0")
        # Indices only group roles (gaps are fine), but the runner needs one for every role.
        missing = [role for role in roles if role not in self.allocation]
        if missing:
            problems.append(
                f"allocation: gives no worker index for roles {', '.join(missing)}; give every "
                f"role one (e.g. allocation.{missing[0]}=0) or leave allocation empty for a "
                "worker per role"
            )
        return problems


def tokenizer_source(model: ModelConfig) -> str:
    """Where a role's tokenizer comes from: tokenizer_path, 'builtin' (built-in models) or the
    model directory."""
    source = model.tokenizer_path or model.path
    return "builtin" if source.startswith("builtin:") else source


def interface_args(cfg: Any) -> dict[str, Any]:
    """A hyperparameter dataclass as plain interface keyword arguments."""
    return dataclasses.asdict(cfg)
