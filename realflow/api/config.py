"""Strict config machinery: documented dataclass fields, key=value overrides, YAML presets.

Configs are plain dataclasses. A field is documented and constrained with `field_(...)`:

    @dataclasses.dataclass
    class PPOHyperparameters:
        kl_ctl: float = field_(0.1, "KL penalty coefficient", ge=0.0)

`apply_overrides(cls, overrides, presets)` builds a config and reports *every* problem at once
(unknown key with the closest valid one, wrong type, bad value) as a `ConfigError` whose lines
carry dotted paths. A dataclass may define `validate(self) -> list[str]` for rules across fields;
its messages are prefixed with the dataclass's dotted path.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any


class ConfigError(ValueError):
    """Every problem found in a config, one per line, each with its dotted path."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def field_(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with a help text (shown by --help) and simple value rules."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "ge": ge, "gt": gt}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaf_paths(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted leaf key of a config class, mapped to its field."""
    out: dict[str, dataclasses.Field] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if _is_dataclass_type(hints[f.name]):
            out.update(leaf_paths(hints[f.name], path + "."))
        else:
            out[path] = f
    return out


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] or X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return "|".join(type_name(a) for a in args) + (
            "|None" if len(args) < len(typing.get_args(tp)) else ""
        )
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def describe_fields(cls: type) -> str:
    """Help text: one line per dotted key with type, default and doc."""
    try:  # defaults as the experiment sets them (a parent's default_factory may change a leaf's)
        instance = cls()
    except TypeError:  # a required field: fall back to the leaf fields' own defaults
        instance = None
    rows = []
    for path, f in leaf_paths(cls).items():
        owner_hints = _owner_hints(cls, path)
        tp = type_name(owner_hints[f.name])
        if instance is not None:
            default = repr(functools.reduce(getattr, path.split("."), instance))
        elif f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        doc = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            doc += f" One of: {', '.join(map(str, f.metadata['choices']))}."
        rows.append(f"  {path} ({tp}, default {default})\n      {doc}".rstrip())
    return "\n".join(rows)


def _owner_hints(cls: type, path: str) -> dict[str, Any]:
    owner = cls
    for part in path.split(".")[:-1]:
        owner = _hints(owner)[part]
    return _hints(owner)


def closest_key(key: str, valid: Iterable[str]) -> str | None:
    """The valid key a user most likely meant by the unknown `key`, or None.

    A valid key with the same leaf name wins (`actor.lr` -> `actor.optimizer.lr`): the one sharing
    most of `key`'s sections, in order, then the first declared. Otherwise the most similar
    sibling, then the most similar key anywhere, then the most similar leaf name.
    """
    valid = list(valid)
    parent, _, tail = key.rpartition(".")
    same_leaf = [v for v in valid if v.rpartition(".")[2] == tail]
    if same_leaf:
        sections = parent.split(".") if parent else []
        return max(same_leaf, key=lambda v: _n_common(sections, v.split(".")[:-1]))
    siblings = [v for v in valid if v.rpartition(".")[0] == parent]
    for pool in (siblings, valid):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    by_tail = {v.rpartition(".")[2]: v for v in valid}
    match = difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.7)
    return by_tail[match[0]] if match else None


def _n_common(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two section lists."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _check_key(cls: type, key: str, valid: dict[str, dataclasses.Field]) -> str | None:
    """None if `key` names a leaf (or an entry inside a dict-typed leaf), else a problem."""
    if key in valid:
        return None
    for path in valid:
        if (
            key.startswith(path + ".")
            and typing.get_origin(_owner_hints(cls, path)[path.rpartition(".")[2]]) is dict
        ):
            return None
    msg = f"{key}: unknown key"
    guess = closest_key(key, valid)
    if guess:
        msg += f"; did you mean '{guess}'?"
    else:
        prefixes = sorted({p.split(".")[0] for p in valid})
        msg += f"; top-level keys are: {', '.join(prefixes)}"
    return msg


def _omegaconf_problem(e: Exception, key: str, value: Any) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    for marker in ("\n", "    full_key"):
        text = text.split(marker)[0]
    return f"{key}={value!r}: {text}"


def parse_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"'{item}': overrides are written key=value (e.g. ppo.kl_ctl=0.05)"])
    return key.strip(), value


def apply_overrides(cls: type, overrides: Sequence[str] = (), presets: Sequence[str] = ()) -> Any:
    """Build `cls` from its defaults, then YAML `presets` in order, then `overrides`
    ("a.b=value"; later wins). Raises ConfigError listing every problem."""
    from omegaconf import ListConfig, OmegaConf

    conf = OmegaConf.structured(cls)
    valid = leaf_paths(cls)
    problems: list[str] = []
    items: list[tuple[str, Any, str]] = []
    for preset in presets:
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(preset), resolve=True)
        except Exception as e:  # a missing file or bad YAML is the user's to fix
            problems.append(f"--config {preset}: cannot read YAML preset: {e}")
            continue
        if not isinstance(loaded, dict):
            problems.append(
                f"--config {preset}: a preset must map keys to values, got a {type(loaded).__name__}"
            )
            continue
        for key, value in _flatten(loaded, ""):
            items.append((key, value, f"(from {preset})"))
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        if value != "":
            try:  # YAML-typed, as in a preset: 3 -> int, [a,b] -> list
                value = OmegaConf.from_dotlist([f"x={value}"]).x
            except Exception as e:  # bad YAML or interpolation: the user's to fix
                problems.append(_omegaconf_problem(e, key, value))
                continue
        items.append((key, value, ""))
    for key, value, origin in items:
        problem = _check_key(cls, key, valid)
        if problem is None:
            try:
                # A list replaces the old one either way; merging converts its dict items into
                # the dataclass a typed list holds (checking their keys and types).
                is_list = isinstance(value, (list, ListConfig))
                OmegaConf.update(conf, key, value, merge=is_list)
            except Exception as e:
                problem = _omegaconf_problem(e, key, value)
        if problem:
            problems.append(f"{problem} {origin}".rstrip())
    cfg = OmegaConf.to_object(conf)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _flatten(d: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def validate(cfg: Any, prefix: str = "") -> list[str]:
    """Check field rules (choices, ge, gt) and each dataclass's own `validate()`, recursively."""
    problems: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            problems.extend(validate(value, path + "."))
            continue
        choices, ge, gt = f.metadata.get("choices"), f.metadata.get("ge"), f.metadata.get("gt")
        if choices and value not in choices:
            msg = f"{path}: {value!r} is not one of {', '.join(map(repr, choices))}"
            guess = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            problems.append(msg + (f"; did you mean '{guess[0]}'?" if guess else ""))
        if ge is not None and value is not None and value < ge:
            problems.append(f"{path}: {value!r} must be >= {ge}")
        if gt is not None and value is not None and value <= gt:
            problems.append(f"{path}: {value!r} must be > {gt}")
    own = getattr(cfg, "validate", None)
    if callable(own):
        problems.extend(f"{prefix}{p}" if prefix else p for p in own())
    return problems


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config dataclass."""
    from enum import Enum

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)
