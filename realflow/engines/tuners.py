"""Adapters (LoRA, DoRA, IA3, ... through peft) on a trained role's model.

    spec = AdapterSpec("lora", ("all-linear",), {"r": 8, "lora_alpha": 16})
    apply_adapters(module, spec, seed=1, base_path="/ckpt/base")   # before build_train_engine

peft injects its layers into the module in place (`peft.inject_adapter_in_model`). Only the
adapter parameters keep `requires_grad` (plus, for a value or reward head, the head: peft's
`modules_to_save`), so only they reach the optimizer; the base weights are frozen and never
change. That is what lets another role run on the same module with the adapters disabled
(`BaseWeightsEngine`: e.g. the reference model of DPO/PPO/GRPO, `ref.base_of=actor`), and what a
parameter reallocation of an adapted model has to move: only `adapter_names(module)`.

A tuner is a builder `fn(target_modules: list[str], args: dict) -> peft.PeftConfig` registered
in `TUNERS`; the built-in ones wrap peft's config classes, and a plugin adds its own:

    from realflow.api.registry import TUNERS

    @TUNERS.register("lora_plus_rslora")
    def build(target_modules, args):
        import peft
        return peft.LoraConfig(target_modules=target_modules, use_rslora=True, **args)

Importing this module does not import peft: the builders and the functions below import it when
called (only roles with adapters pay for it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from realflow.api.registry import TUNERS, closest
from realflow.engines.config import ALL_LINEAR, AdapterSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")

# TUNERS name -> (peft config class, fixed arguments).
PEFT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("LoraConfig", {}),
    "dora": ("LoraConfig", {"use_dora": True}),
    "ia3": ("IA3Config", {}),
    "loha": ("LoHaConfig", {}),
    "lokr": ("LoKrConfig", {}),
    "oft": ("OFTConfig", {}),
    "boft": ("BOFTConfig", {}),
    "hra": ("HRAConfig", {}),
}


class AdapterError(ValueError):
    """Adapter settings that cannot apply to this model (unknown module, bad peft argument)."""


def _peft_builder(class_name: str, fixed: dict[str, Any]) -> Callable[..., Any]:
    def build(target_modules: list[str], args: dict[str, Any]) -> Any:
        import peft

        cls = getattr(peft, class_name)
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in args if k not in fields]
        if unknown:
            raise AdapterError(
                f"peft.args: {class_name} has no field {_with_hints(unknown, fields)}; see "
                f"peft's {class_name} for its fields"
            )
        return cls(target_modules=list(target_modules), **fixed, **args)

    build.__name__ = f"peft.{class_name}" + ("(use_dora=True)" if fixed else "")
    return build


def _with_hints(names: list[str], known: list[str]) -> str:
    """'a' (did you mean 'b'?), 'c' ..."""
    out = []
    for name in names:
        guess = closest(name, known)
        out.append(f"'{name}'" + (f" (did you mean '{guess}'?)" if guess else ""))
    return ", ".join(out)


for _name, (_cls, _fixed) in PEFT_METHODS.items():
    TUNERS.register(_name, _peft_builder(_cls, _fixed))


# ---- applying ---------------------------------------------------------------------------------


def linear_names(module: nn.Module) -> list[str]:
    """Leaf names of the block projections ('all-linear'): never the LM or value head."""
    return sorted(
        {
            name.rsplit(".", 1)[1]
            for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers.")
        }
    )


def resolve_targets(module: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """`targets` with 'all-linear' expanded; a name matching no module is an AdapterError."""
    if list(targets) == [ALL_LINEAR]:
        return linear_names(module)
    names = [n for n, _ in module.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        known = linear_names(module)
        raise AdapterError(
            f"target_modules {_with_hints(missing, known)} name no module of the model; its "
            f"projections are {', '.join(known)} ('all-linear' takes them all)"
        )
    return list(targets)


def apply_adapters(module: nn.Module, spec: AdapterSpec, seed: int, base_path: str) -> Any:
    """Inject `spec`'s adapters into `module` (in place, initialised from `seed` whatever the
    global RNG state) and freeze everything else; returns the peft config. A value or reward
    head (`module.score`) stays trainable through peft's `modules_to_save`."""
    from peft import inject_adapter_in_model

    targets = resolve_targets(module, spec.target_modules)
    args = dict(spec.args)
    if spec.method == "ia3" and "feedforward_modules" not in args:
        # peft would look the default up by HF model_type; ours: the MLP's down projection.
        args["feedforward_modules"] = [t for t in targets if t == "down_proj"]
    config = TUNERS.get(spec.method)(targets, args)
    if getattr(module, "score", None) is not None and hasattr(config, "modules_to_save"):
        config.modules_to_save = sorted(set(config.modules_to_save or []) | {"score"})
    config.base_model_name_or_path = base_path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, module)
    check_exportable(module)
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in module.parameters())
    logger.info(
        "%s adapters on %s: %d trainable of %d parameters (%.2f%%)",
        spec.method,
        ", ".join(config.target_modules) if not isinstance(config.target_modules, str) else "",
        n_train,
        n_all,
        100.0 * n_train / max(1, n_all),
    )
    return config


def check_exportable(module: nn.Module) -> None:
    """Fail now, not at the first checkpoint, when the adapters have no HF peft form."""
    from realflow.models.adapters import adapter_to_hf, hf_adapter_config

    as_dict = _config_dict(peft_config(module))
    hf_sd = adapter_to_hf(module, adapter_state_dict(module, module.state_dict()))
    hf_adapter_config(module, as_dict, hf_sd, "")


def _config_dict(config: Any) -> dict[str, Any]:
    """peft's `to_dict()` with sets as sorted lists (JSON)."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def has_adapters(module: nn.Module) -> bool:
    """Whether peft layers were injected into `module` (it then carries `peft_config`)."""
    return hasattr(module, "peft_config")


def peft_config(module: nn.Module) -> Any:
    return module.peft_config["default"]


def adapter_names(module: nn.Module) -> list[str]:
    """Names of the parameters adapters train: all that changes in an adapted model."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def _switchable(module: nn.Module) -> list[nn.Module]:
    """peft's tuner layers and modules_to_save wrappers (both have enable_adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    kinds = (BaseTunerLayer, ModulesToSaveWrapper)
    return [m for m in module.modules() if isinstance(m, kinds)]


def tuner_layers(module: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """The module computing with its base weights only (adapters off), restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    layers = _switchable(module)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:  # enable_adapters toggles requires_grad itself: restore ours
            p.requires_grad_(flag)


def _parent(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (module.get_submodule(parent) if parent else module), attr


@contextlib.contextmanager
def merged_adapters(module: nn.Module) -> Iterator[nn.Module]:
    """The module with each adapted layer replaced by a merged copy of its base layer (base +
    adapter, as peft's `merge` computes it); the originals, untouched, are put back after. The
    copies cost one more copy of the adapted weights while the context lasts."""
    swapped = []
    try:
        with torch.no_grad():
            for name, layer in tuner_layers(module).items():
                merged = copy.deepcopy(layer)
                merged.merge()
                parent, attr = _parent(module, name)
                setattr(parent, attr, merged.get_base_layer())
                swapped.append((parent, attr, layer))
        yield module
    finally:
        for parent, attr, layer in swapped:
            setattr(parent, attr, layer)


def merged_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Plain realflow weights (no peft names) of `module` with adapters merged, computed in
    fp32 from `state_dict` (the module's full state dict in peft names, e.g. a train engine's
    fp32 masters); a value/reward head is the trained modules_to_save copy."""
    layers = tuner_layers(module)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for prefix, layer in layers.items():
            own = {
                k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")
            }
            merged = copy.deepcopy(layer).float()
            merged.load_state_dict({k: v.float() for k, v in own.items()})
            merged.merge()
            for k, v in merged.get_base_layer().state_dict().items():
                out[f"{prefix}.{k}"] = v
    for key, value in state_dict.items():
        if any(key.startswith(p + ".") for p in layers) or ".original_module." in key:
            continue
        out[key.replace(".modules_to_save.default.", ".")] = value
    return out


def adapter_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The adapter weights in peft's file format (realflow module names, no adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(module, state_dict=state_dict, save_embedding_layers=False)


def shareable_problems(config: Any) -> list[str]:
    """Why a role cannot serve as its base weights with adapters disabled (empty: it can)."""
    problems = []
    bias = getattr(config, "bias", "none")
    if bias != "none":
        problems.append(f"its adapters train biases (bias={bias!r}), which are base weights")
    if getattr(config, "modules_to_save", None):
        problems.append(f"it trains whole modules {config.modules_to_save} (modules_to_save)")
    return problems


# ---- a role on another role's base weights ---------------------------------------------------


class BaseWeightsEngine:
    """An inference engine for a role that computes with another role's base weights: the
    owner's module with its adapters disabled, run through the owner's engine (same device,
    precision and offload). The base weights are frozen, so every call sees the same weights
    whatever the owner's training did; no second copy of them exists."""

    def __init__(self, owner: Any, owner_name: str):
        problems = ["it has no adapters (lora.rank or peft.method)"]
        if has_adapters(owner.module):
            problems = shareable_problems(peft_config(owner.module))
        if problems:
            raise AdapterError(
                f"role '{owner_name}' cannot lend its base weights: {'; '.join(problems)}"
            )
        self.owner = owner
        self.owner_name = owner_name
        self.module = owner.module
        self.device = owner.device

    @property
    def offloaded(self) -> bool:
        return False  # the owner's engine moves the weights

    def forward_no_grad(self, fn: Callable[[nn.Module], T]) -> T:
        """`fn(module)` with the adapters disabled, through the owner's `forward_no_grad`."""
        was_offloaded = getattr(self.owner, "offloaded", False)
        with adapters_disabled(self.module):
            try:
                return self.owner.forward_no_grad(fn)
            finally:
                if was_offloaded:
                    self.owner.offload()

    def forward_generate(self, fn: Callable[[nn.Module], T]) -> T:
        return self.forward_no_grad(lambda _m: fn(self.module))

    def offload(self) -> None:
        pass

    def onload(self) -> None:
        pass


# ---- saving ------------------------------------------------------------------------------------


def save_adapters(engine: Any, save_dir: str, tokenizer: Any = None) -> None:
    """Write a train engine's adapters as an HF peft adapter directory (realflow/models/
    adapters.py), and the merged model under `merged/` when `engine_cfg.save_merged`.

    The adapters are saved in `save_dtype`, "auto" meaning fp32 (the dtype realflow created
    them in); the merged model in the engine's save dtype (auto: the base checkpoint's)."""
    from realflow.models.adapters import save_adapter

    module = engine.module
    weights = engine.module_state_dict()
    config = peft_config(module)
    as_dict = _config_dict(config)
    name = engine.engine_cfg.save_dtype
    adapter_dtype = torch.float32 if name == "auto" else getattr(torch, name)
    merged = None
    if engine.engine_cfg.save_merged:
        merged = {k: v.to(engine.save_dtype) for k, v in merged_state_dict(module, weights).items()}
    save_adapter(
        module,
        save_dir,
        adapter_state_dict(module, weights),
        as_dict,
        config.base_model_name_or_path or "",
        tokenizer,
        adapter_dtype,
        merged,
    )
