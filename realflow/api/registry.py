"""Name -> class registries, and loading of users' plugin modules.

One small generic type, one instance per family. Built-in entries live in the modules listed by
each registry and are imported on first lookup, so `import realflow` stays cheap.

    from realflow.api.registry import INTERFACES

    @INTERFACES.register("my_reward")
    class MyReward: ...

    INTERFACES.get("my_reward")     # -> MyReward
    INTERFACES.get("my_rewad")      # RegistryError: ... did you mean 'my_reward'?
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RegistryError(ValueError):
    """A registry miss or a double registration: a user error with a clear message."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to `name`, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


class Registry(Generic[T]):
    """Maps names to objects (usually classes) of one family.

    `builtin_modules` are imported the first time the registry is read, which registers the
    built-in entries without importing them at package import time. `builtin_names`, when
    given, are the names those modules register: listing names and `in` then import nothing,
    so checking a config stays cheap (tests keep the list equal to what the modules register).
    """

    def __init__(
        self,
        family: str,
        builtin_modules: tuple[str, ...] = (),
        builtin_names: tuple[str, ...] = (),
    ):
        self.family = family
        self._builtin_modules = builtin_modules
        self._builtin_names = frozenset(builtin_names)
        self._builtins_loaded = False
        self._builtins_error: BaseException | None = None
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register `obj` under `name`; without `obj`, return a decorator."""
        if obj is None:

            def decorator(o: T) -> T:
                self._add(name, o)
                return o

            return decorator
        self._add(name, obj)
        return obj

    def _add(self, name: str, obj: T) -> None:
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.family} names must be non-empty strings, got {name!r}")
        # Built-ins first, so a plugin that reuses a built-in name fails here, not later.
        self._load_builtins()
        if name in self._entries and self._entries[name] is not obj:
            raise RegistryError(
                f"{self.family} '{name}' is already registered (by {_describe(self._entries[name])}); "
                f"pick another name for {_describe(obj)}"
            )
        self._entries[name] = obj

    def unregister(self, name: str) -> None:
        """Remove an entry (tests use this to clean up after registering)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        self._load_builtins()
        if name in self._entries:
            return self._entries[name]
        raise RegistryError(self.miss_message(name))

    def miss_message(self, name: str) -> str:
        known = self.names()
        msg = f"unknown {self.family} '{name}'. Known: {', '.join(known) or '(none)'}"
        guess = closest(name, known)
        if guess:
            msg += f". Did you mean '{guess}'?"
        return msg

    def names(self) -> list[str]:
        if not self._builtin_names:
            self._load_builtins()
        return sorted(self._builtin_names | set(self._entries))

    def __contains__(self, name: object) -> bool:
        if not self._builtin_names:
            self._load_builtins()
        return name in self._builtin_names or name in self._entries

    def _load_builtins(self) -> None:
        if self._builtins_error is not None:  # fail every time, not only the first
            raise ImportError(
                f"the built-in {self.family} entries failed to load: {self._builtins_error!r}"
            ) from self._builtins_error
        if self._builtins_loaded:
            return
        self._builtins_loaded = True
        for module in self._builtin_modules:
            try:
                importlib.import_module(module)
            except BaseException as e:
                self._builtins_error = e
                raise

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {len(self._entries)} entries)"


class PluginError(RegistryError):
    """A plugin raised while importing; `traceback_text` holds its traceback."""

    def __init__(self, message: str, traceback_text: str):
        super().__init__(message)
        self.traceback_text = traceback_text


def _describe(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else repr(obj)


EXPERIMENTS: Registry[Any] = Registry("experiment", ("realflow.experiments",))
DATASETS: Registry[Any] = Registry("dataset", ("realflow.data.datasets",))
INTERFACES: Registry[Any] = Registry(
    "interface", ("realflow.interfaces", "realflow.system.toy_interfaces")
)
MODEL_FAMILIES: Registry[Any] = Registry("model family", ("realflow.models.families",))
REWARD_SCORERS: Registry[Any] = Registry(
    "reward scorer",
    ("realflow.interfaces.scorers",),
    builtin_names=(
        "embedding_similarity",
        "hf_classifier",
        "model",
        "python",
        "task",
        "task_steps",
    ),
)
# fn(mfc: MFCDef, data: SequenceSample, model: Model) -> dict[str, float], run on the worker
# after every generate/inference call (see realflow/interfaces/metrics.py).
METRICS: Registry[Any] = Registry(
    "metric", ("realflow.interfaces.metrics",), builtin_names=("generation", "scores")
)
# Callback classes, run in the driver on run events (see realflow/api/callbacks.py).
CALLBACKS: Registry[Any] = Registry(
    "callback",
    ("realflow.api.callbacks",),
    builtin_names=("early_stopping", "target_metric"),
)

# Optimizer factories `(param_groups, lr=..., **kwargs) -> torch.optim.Optimizer` (any
# torch.optim.Optimizer subclass is one), named by `<role>.optimizer.name`
# (see realflow/engines/optimizers.py).
OPTIMIZERS: Registry[Any] = Registry(
    "optimizer",
    ("realflow.engines.optimizers",),
    builtin_names=(
        "adadelta", "adafactor", "adagrad", "adam", "adamax", "adamw", "asgd", "nadam",
        "radam", "rmsprop", "rprop", "sgd",
    ),
)  # fmt: skip
# LR multipliers after warmup `fn(progress, min_lr_ratio, **args) -> float`, progress in [0, 1],
# named by `<role>.optimizer.lr_scheduler_type` (see realflow/engines/schedule.py).
LR_SCHEDULES: Registry[Any] = Registry(
    "LR schedule",
    ("realflow.engines.schedule",),
    builtin_names=("constant", "cosine", "linear"),
)
# Tuner builders `fn(target_modules: list[str], args: dict) -> peft.PeftConfig`, named by
# `<role>.peft.method` (see realflow/engines/tuners.py).
TUNERS: Registry[Any] = Registry(
    "tuner",
    ("realflow.engines.tuners",),
    builtin_names=("boft", "dora", "hra", "ia3", "loha", "lokr", "lora", "oft"),
)
# Losses, by the interface that calls them; each interface documents the signature (see
# realflow.interfaces.losses). Loss scales weigh the tokens of a sample (realflow.data.loss_scale).
_LOSS_MODULES = ("realflow.interfaces.losses",)
SFT_LOSSES: Registry[Any] = Registry("sft loss", _LOSS_MODULES, builtin_names=("nll",))
DPO_LOSSES: Registry[Any] = Registry("dpo loss", _LOSS_MODULES, builtin_names=("ipo", "sigmoid"))
RW_LOSSES: Registry[Any] = Registry("rw loss", _LOSS_MODULES, builtin_names=("bradley_terry",))
LOSS_SCALES: Registry[Any] = Registry(
    "loss scale",
    ("realflow.data.loss_scale",),
    builtin_names=("all", "answer", "field", "last_turn", "role_weights"),
)

ENTRY_POINT_GROUP = "realflow.plugins"
_loaded_plugins: set[str] = set()


def load_plugins(specs: Iterable[str] = (), entry_points: bool = True) -> list[str]:
    """Import users' plugin modules so their register calls run.

    Each spec is a path to a `.py` file or an importable module name. Modules in the
    `realflow.plugins` entry-point group load too. Returns the names loaded now. Loading the same
    plugin twice is a no-op.
    """
    loaded = []
    if entry_points:
        from importlib.metadata import entry_points as _eps

        for ep in _eps(group=ENTRY_POINT_GROUP):
            key = f"ep:{ep.value}"
            if key not in _loaded_plugins:
                _loaded_plugins.add(key)
                ep.load()
                loaded.append(ep.value)
    for spec in specs:
        spec = spec.strip()
        # A file is known by its resolved path: `x.py` and `./x.py` must not run it twice.
        key = str(Path(spec).resolve()) if _is_file_spec(spec) else spec
        if not spec or key in _loaded_plugins:
            continue
        try:
            _import_plugin(spec)
        except RegistryError:
            raise
        except Exception as e:  # the user's code: report it with their frames, not a crash
            from realflow.api.tracebacks import format_exception

            raise PluginError(
                f"plugin '{spec}' failed while importing: {type(e).__name__}: {e}",
                format_exception(e),
            ) from e
        _loaded_plugins.add(key)
        loaded.append(spec)
    return loaded


def import_file(path: Path, prefix: str) -> ModuleType:
    """Import a .py file as a module (registered in sys.modules under a name unique to its
    resolved path) and return it."""
    name = f"{prefix}_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def absolute_plugin_specs(specs: Iterable[str]) -> list[str]:
    """`specs` with plugin file paths made absolute (workers may run in another directory)."""
    return [str(Path(s.strip()).resolve()) if _is_file_spec(s.strip()) else s for s in specs]


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or Path(spec).exists()


def _import_plugin(spec: str) -> None:
    path = Path(spec)
    if _is_file_spec(spec):
        if not path.is_file():
            raise RegistryError(f"plugin file '{spec}' does not exist")
        import_file(path, "realflow_plugin")
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and spec.startswith(e.name):
            raise RegistryError(
                f"plugin module '{spec}' cannot be imported: {e}. "
                "Give a path to a .py file or an importable module name."
            ) from e
        raise
