"""Adapters of a realflow model saved as an HF peft adapter directory.

A PackedTransformer with peft layers injected (realflow/engines/tuners.py) is saved with

    save_adapter(model, "ckpt/actor", adapter_sd, tokenizer=tok, merged_sd=None)

as `adapter_config.json` + `adapter_model.safetensors` (+ tokenizer files) in HF names, so that

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "ckpt/actor")

computes what the realflow model computes; `merged_sd` (plain realflow names, adapters merged)
also writes the merged model as an HF directory under `ckpt/actor/merged`.

Names go through the family's `hf_modules` map. Where HF fuses several realflow modules into
one (gpt2's `c_attn` = q | k | v by output rows), LoRA and DoRA convert exactly: per-part LoRAs
`B_i A_i` of rank r become one LoRA of rank k*r with A the stacked `A_i` and B block-diagonal
(zero rows for a part without an adapter), alpha scaled so that the scaling is unchanged, and
DoRA magnitudes concatenated (a part without an adapter: the norms of its base rows). Other
methods on a fused module are refused with the modules to leave out.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from realflow.models.families.base import StateDict, family_for_config
from realflow.models.transformer import PackedTransformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TASK_TYPES = {"lm": "CAUSAL_LM", "critic": "TOKEN_CLS", "reward": "SEQ_CLS"}
# Config fields naming modules by pattern: resolved to the exact modules before export.
_RESOLVED_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")


class AdapterExportError(ValueError):
    """Adapters that have no exact HF peft form (e.g. IA3 on gpt2's fused c_attn)."""


def hf_module_map(model: PackedTransformer) -> dict[str, tuple[str, int]]:
    family = family_for_config(model.config)
    if family.hf_modules is None:
        raise AdapterExportError(
            f"model family '{family.name}' gives no hf_modules map, so its adapters cannot be "
            "saved in HF names; add one to its HFFamily (see realflow/models/families/base.py)"
        )
    return family.hf_modules(model.config, model.head)


def _split(key: str, modules: dict[str, Any]) -> tuple[str, str]:
    """(realflow module, rest) of a peft state-dict key: the longest module prefix."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return prefix, ".".join(parts[i:])
    raise AdapterExportError(f"adapter weight {key!r} belongs to no known module")


def _base_linear(model: torch.nn.Module, name: str) -> torch.nn.Module:
    module = model.get_submodule(name)
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


class _Fused:
    """The adapter weights of the realflow parts of one fused HF module."""

    def __init__(self, model: torch.nn.Module, hf_name: str, parts: list[str]):
        self.model, self.hf_name, self.parts = model, hf_name, parts
        self.items: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, part: int, rest: str, tensor: torch.Tensor) -> None:
        self.items.setdefault(rest, {})[part] = tensor

    def convert(self) -> StateDict:
        out: StateDict = {}
        a_parts = self.items.get("lora_A.weight", {})
        for rest, by_part in self.items.items():
            if rest == "lora_A.weight":
                out[rest] = torch.cat([by_part[i] for i in sorted(by_part)])
            elif rest == "lora_B.weight":
                out[rest] = self._block_diagonal(by_part, a_parts)
            elif rest == "lora_magnitude_vector":
                out[rest] = torch.cat([self._magnitude(i, by_part) for i in range(len(self.parts))])
            elif rest in ("bias", "base_layer.bias"):
                out[rest] = torch.cat([self._bias(i, by_part) for i in range(len(self.parts))])
            else:
                raise AdapterExportError(
                    f"'{rest}' of {self.parts} cannot be saved on HF's fused module "
                    f"{self.hf_name}: only LoRA and DoRA convert exactly; leave "
                    f"{', '.join(p.rsplit('.', 1)[1] for p in self.parts)} out of target_modules"
                )
        if "bias" in out and "base_layer.bias" in out:  # some parts targeted, others not
            out["base_layer.bias"] = out.pop("bias")
        return {f"{self.hf_name}.{rest}": t for rest, t in out.items()}

    def _rows(self, i: int) -> int:
        return _base_linear(self.model, self.parts[i]).out_features

    def _block_diagonal(self, b: dict[int, torch.Tensor], a: dict[int, torch.Tensor]):
        ranks = [a[i].shape[0] if i in a else 0 for i in range(len(self.parts))]
        some = next(iter(b.values()))
        out = torch.zeros(sum(self._rows(i) for i in range(len(self.parts))), sum(ranks))
        out = out.to(some.dtype)
        row = col = 0
        for i in range(len(self.parts)):
            if i in b:
                out[row : row + self._rows(i), col : col + ranks[i]] = b[i]
            row, col = row + self._rows(i), col + ranks[i]
        return out

    def _magnitude(self, i: int, by_part: dict[int, torch.Tensor]) -> torch.Tensor:
        if i in by_part:
            return by_part[i]
        weight = _base_linear(self.model, self.parts[i]).weight.detach()
        return torch.linalg.vector_norm(weight.float(), dim=1).to(weight.dtype)

    def _bias(self, i: int, by_part: dict[int, torch.Tensor]) -> torch.Tensor:
        if i in by_part:
            return by_part[i]
        return _base_linear(self.model, self.parts[i]).bias.detach()


def adapter_to_hf(model: PackedTransformer, adapter_sd: StateDict) -> StateDict:
    """peft adapter weights in realflow names (peft's file format: `layers.0.attn.q_proj.
    lora_A.weight`) -> the same in HF names (`base_model.model.model.layers.0.self_attn.q_proj.
    lora_A.weight`); fused HF modules are converted as the module docstring says."""
    modules = hf_module_map(model)
    by_hf: dict[str, list[str]] = {}
    for ours, (theirs, _) in sorted(modules.items(), key=lambda kv: kv[1]):
        by_hf.setdefault(theirs, []).append(ours)
    hf_sd: StateDict = {}
    fused: dict[str, _Fused] = {}
    for key, tensor in adapter_sd.items():
        ours, rest = _split(key, modules)
        theirs, part = modules[ours]
        parts = by_hf[theirs]
        if len(parts) == 1:
            hf_sd[f"{theirs}.{rest}"] = tensor
        else:
            fused.setdefault(theirs, _Fused(model, theirs, parts)).add(part, rest, tensor)
    for f in fused.values():
        hf_sd.update(f.convert())
    return {f"base_model.model.{k}": v for k, v in hf_sd.items()}


def _suffixes(chosen: set[str], universe: set[str], within: set[str] | None = None) -> list[str]:
    """The shortest dotted suffixes naming exactly the `chosen` names among `universe`; with
    `within`, each suffix also names only members of `within` or only non-members (so that
    feedforward_modules can be a subset of target_modules as peft requires)."""
    out = set()
    for name in chosen:
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            hits = {u for u in universe if u == suffix or u.endswith("." + suffix)}
            pure = within is None or hits <= within or not hits & within
            if hits <= chosen and pure:
                out.add(suffix)
                break
    return sorted(out)


def _hf_names(
    ours: set[str], modules: dict[str, tuple[str, int]], targeted: set[str], field: str
) -> set[str]:
    """HF modules of a set of realflow modules; a fused HF module must be all in or all out."""
    names = set()
    for theirs in {modules[m][0] for m in ours}:
        parts = {m for m, (t, _) in modules.items() if t == theirs and m in targeted | ours}
        if not parts <= ours:
            raise AdapterExportError(
                f"{field}: HF fuses {sorted(parts)} into {theirs}; select all or none of them"
            )
        names.add(theirs)
    return names


def _matches(module: str, names: Any) -> bool:
    """peft's rule for a list of module names (or a regex string)."""
    import re

    if names is None:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == n or module.endswith("." + n) for n in names)


def hf_adapter_config(
    model: PackedTransformer, config: dict[str, Any], hf_sd: StateDict, base_path: str
) -> dict[str, Any]:
    """`config` (peft's `to_dict()` of the realflow-side config) in HF names."""
    modules = hf_module_map(model)
    universe = {t for t, _ in modules.values()}
    targeted = {n for n, m in model.named_modules() if hasattr(m, "get_base_layer")} & set(modules)
    out = dict(config)
    hf_targets = _hf_names(targeted, modules, targeted, "target_modules")
    hf_ff: set[str] = set()
    if out.get("feedforward_modules"):
        ff = {m for m in targeted if _matches(m, out["feedforward_modules"])}
        hf_ff = _hf_names(ff, modules, targeted, "feedforward_modules")
        out["feedforward_modules"] = _suffixes(hf_ff, universe, hf_ff)
    out["target_modules"] = _suffixes(hf_targets, universe, hf_ff)
    if out.get("modules_to_save"):
        saved = {m for m in modules if _matches(m, out["modules_to_save"])}
        hf_saved = _hf_names(saved, modules, set(), "modules_to_save")
        out["modules_to_save"] = _suffixes(hf_saved, universe)
    for field in _RESOLVED_FIELDS:
        if field in out:
            out[field] = None
    _rank_patterns(out, hf_sd, hf_targets)
    out["base_model_name_or_path"] = base_path
    out["task_type"] = TASK_TYPES[model.head]
    out["inference_mode"] = True
    out["auto_mapping"] = None
    return out


def _rank_patterns(out: dict[str, Any], hf_sd: StateDict, hf_targets: set[str]) -> None:
    """Explicit rank and alpha per HF module whose LoRA rank differs from `r` (fused modules,
    or the user's own rank_pattern), keeping `alpha / r` (or `alpha / sqrt(r)`) per module."""
    if "r" not in out or "lora_alpha" not in out:
        return
    ranks, alphas = {}, {}
    rslora = bool(out.get("use_rslora"))
    for name in sorted(hf_targets):
        a = hf_sd.get(f"base_model.model.{name}.lora_A.weight")
        if a is None:
            continue
        own_r, own_alpha = (
            _pattern_value(name, out, "rank_pattern", "r"),
            _pattern_value(name, out, "alpha_pattern", "lora_alpha"),
        )
        rank = a.shape[0]
        if rank % own_r:
            raise AdapterExportError(f"{name}: LoRA rank {rank} is not a multiple of {own_r}")
        k = rank // own_r
        alpha = own_alpha * (math.sqrt(k) if rslora else k)
        if rank != out["r"]:
            ranks[name] = rank
        if alpha != out["lora_alpha"]:
            alphas[name] = alpha
    out["rank_pattern"], out["alpha_pattern"] = ranks, alphas


def _pattern_value(hf_name: str, out: dict[str, Any], pattern_field: str, field: str) -> Any:
    # Patterns written by the user are realflow names; realflow checks they are leaf names
    # shared with HF (see realflow/engines/tuners.py), so they match the HF leaf here.
    leaf = hf_name.rsplit(".", 1)[1]
    return (out.get(pattern_field) or {}).get(leaf, out[field])


def save_adapter(
    model: PackedTransformer,
    path: str | os.PathLike,
    adapter_sd: StateDict,
    config: dict[str, Any],
    base_path: str,
    tokenizer: Any | None = None,
    dtype: torch.dtype | None = None,
    merged_sd: StateDict | None = None,
) -> Path:
    """Write the adapter directory (see the module docstring) at `path`, via a temporary
    sibling renamed into place. `dtype` casts the floating adapter weights (default: theirs);
    `merged_sd` is written in its own dtype."""
    from safetensors.torch import save_file

    from realflow.models.hf_io import _swap_into_place, save_hf

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
            raise ValueError(
                f"cannot save an adapter to {path}: it exists and is not a checkpoint "
                "(refusing to replace it)"
            )
    hf_sd = adapter_to_hf(model, adapter_sd)
    hf_config = hf_adapter_config(model, config, hf_sd, base_path)
    hf_sd = {
        k: v.detach().to("cpu", dtype=dtype if dtype and v.is_floating_point() else v.dtype)
        for k, v in hf_sd.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp))
            else:
                tokenizer.save(str(tmp / "tokenizer.json"))
        if merged_sd is not None:
            save_hf(model, tmp / "merged", tokenizer, state_dict=merged_sd)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
