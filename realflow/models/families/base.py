"""What an HF model family is to realflow, and how a checkpoint's config.json finds its family.

A family converts an HF config.json (as a dict) to a `TransformerConfig` and back, converts
state dicts both ways (realflow names <-> HF names, per head), and names the HF parameters of the
embedding, each block and the head. Register one with

    MODEL_FAMILIES.register("mistral", HFFamily(...))

and `load_hf` finds it from `model_type` / `architectures` in config.json.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from realflow.api.registry import MODEL_FAMILIES
from realflow.models.config import HEADS, RopeScaling, TransformerConfig

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFFamily:
    """One HF architecture family.

    - `model_types`: HF `model_type` values this family reads.
    - `architectures`: the HF class name saved for each head ("lm", "critic", "reward"), e.g.
      LlamaForCausalLM / LlamaForTokenClassification / LlamaForSequenceClassification.
    - `config_from_hf(hf_dict) -> TransformerConfig`, `config_to_hf(config) -> hf_dict` (the
      head-independent keys; `save_hf` adds architectures / labels).
    - `state_dict_from_hf(hf_sd, config, head)` -> realflow state dict (HF keys of another head
      are dropped, so an actor checkpoint converts for a critic without its head);
      `state_dict_to_hf(sd, config, head)` -> HF state dict.
    - `hf_param_names(config, head)` -> {"embedding": [...], "block.{i}": [...], "head": [...]}
      listing the HF parameter names of each part.
    - `hf_modules(config, head)` -> {realflow module: (HF module, part)} for every module with
      parameters; realflow modules sharing one HF module are its row blocks in `part` order
      (gpt2's fused `c_attn` holds q, k, v). Adapters (LoRA...) are saved in HF names through
      it; None: this family's adapters cannot be saved for peft.
    """

    name: str
    model_types: tuple[str, ...]
    architectures: dict[str, str]
    config_from_hf: Callable[[dict], TransformerConfig]
    config_to_hf: Callable[[TransformerConfig], dict]
    state_dict_from_hf: Callable[[StateDict, TransformerConfig, str], StateDict]
    state_dict_to_hf: Callable[[StateDict, TransformerConfig, str], StateDict]
    hf_param_names: Callable[[TransformerConfig, str], dict[str, list[str]]]
    hf_modules: Callable[[TransformerConfig, str], dict[str, tuple[str, int]]] | None = None

    def embedding_names(self, config: TransformerConfig, head: str = "lm") -> list[str]:
        return self.hf_param_names(config, head)["embedding"]

    def block_names(self, config: TransformerConfig, i: int, head: str = "lm") -> list[str]:
        return self.hf_param_names(config, head)[f"block.{i}"]

    def head_names(self, config: TransformerConfig, head: str = "lm") -> list[str]:
        return self.hf_param_names(config, head)["head"]

    def matches(self, hf_config: dict) -> bool:
        if hf_config.get("model_type") in self.model_types:
            return True
        archs = hf_config.get("architectures") or []
        return any(a in self.architectures.values() for a in archs)

    def head_of(self, hf_config: dict) -> str | None:
        """The head a checkpoint was saved with, from its `architectures` (None: unknown)."""
        for arch in hf_config.get("architectures") or []:
            for head, name in self.architectures.items():
                if arch == name:
                    return head
        return None


def family_for_hf_config(hf_config: dict) -> HFFamily:
    """The registered family whose model_type / architectures match an HF config.json dict."""
    for name in MODEL_FAMILIES.names():
        family = MODEL_FAMILIES.get(name)
        if family.matches(hf_config):
            return family
    supported = "; ".join(
        f"{n} (model_type {', '.join(MODEL_FAMILIES.get(n).model_types)})"
        for n in MODEL_FAMILIES.names()
    )
    raise ValueError(
        f"unsupported architecture: model_type={hf_config.get('model_type')!r}, "
        f"architectures={hf_config.get('architectures')!r}. Supported families: {supported}. "
        "Register a new one with MODEL_FAMILIES.register(name, HFFamily(...)) (docs/models.md)."
    )


def family_for_config(config: TransformerConfig) -> HFFamily:
    """The family named by `config.family` (RegistryError listing known ones on a miss)."""
    return MODEL_FAMILIES.get(config.family)


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"head {head!r} is unknown; choose one of {HEADS}")


# ----------------------------------------------------------------------------- shared helpers


def with_defaults(hf_config: dict, defaults: dict) -> dict:
    """HF's defaults for keys a config.json may omit, overlaid with the file's values."""
    merged = dict(defaults)
    merged.update({k: v for k, v in hf_config.items() if v is not None})
    return merged


def rope_from_hf(hf: dict, default_theta: float) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers-5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta)) or default_theta
    merged = {**legacy, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ("linear", "llama3"):
        raise ValueError(
            f"rope type {rope_type!r} is not supported by realflow (supported: default, linear, llama3)"
        )
    scaling = RopeScaling(rope_type=rope_type, factor=float(merged["factor"]))
    if rope_type == "llama3":
        scaling.low_freq_factor = float(merged["low_freq_factor"])
        scaling.high_freq_factor = float(merged["high_freq_factor"])
        scaling.original_max_position_embeddings = int(merged["original_max_position_embeddings"])
    return float(theta), scaling


def rope_to_hf(config: TransformerConfig) -> dict:
    """HF keys describing rotary embeddings (both the 5.x and the 4.x spelling)."""
    s = config.rope_scaling
    params: dict = {"rope_type": "default", "rope_theta": config.rope_theta}
    legacy = None
    if s is not None and s.rope_type != "default":
        params.update(rope_type=s.rope_type, factor=s.factor)
        if s.rope_type == "llama3":
            params.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
        legacy = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": config.rope_theta, "rope_parameters": params, "rope_scaling": legacy}


def rename_state_dict(sd: StateDict, name_map: dict[str, str], ignore: list[str]) -> StateDict:
    """Rename keys by `name_map`; keys matching an `ignore` regex are dropped, others are an error."""
    out, unexpected = {}, []
    for key, tensor in sd.items():
        if key in name_map:
            out[name_map[key]] = tensor
        elif not any(re.fullmatch(p, key) for p in ignore):
            unexpected.append(key)
    if unexpected:
        raise ValueError(
            f"unexpected parameters in checkpoint: {sorted(unexpected)[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    return out


def modules_of_name_map(name_map: dict[str, str]) -> dict[str, tuple[str, int]]:
    """{realflow module: (HF module, 0)} of a one-to-one {realflow param: HF param} map."""
    return {
        ours.rsplit(".", 1)[0]: (theirs.rsplit(".", 1)[0], 0) for ours, theirs in name_map.items()
    }


def group_hf_names(name_map: dict[str, str]) -> dict[str, list[str]]:
    """Group an {realflow name: HF name} map into embedding / block.{i} / head HF names."""
    groups: dict[str, list[str]] = {"embedding": []}
    blocks: dict[int, list[str]] = {}
    head: list[str] = []
    for ours, theirs in name_map.items():
        if ours.startswith("layers."):
            blocks.setdefault(int(ours.split(".")[1]), []).append(theirs)
        elif ours.startswith(("embed_tokens.", "embed_positions.")):
            groups["embedding"].append(theirs)
        else:
            head.append(theirs)
    groups.update({f"block.{i}": blocks[i] for i in sorted(blocks)})
    groups["head"] = head
    return groups
