"""Building a role's model on a worker: weights (HF directory or built-in), tokenizer, engine."""

from __future__ import annotations

import logging
from typing import Any

import torch

from realflow.api.interface import Model
from realflow.experiments.common import ModelRole

logger = logging.getLogger(__name__)

BUILTIN_RANDOM = "builtin:tiny"


def load_role_tokenizer(role: ModelRole) -> Any:
    from realflow.data.tokenizer import load_tokenizer

    cfg = role.config
    if cfg.tokenizer_path:
        return load_tokenizer(cfg.tokenizer_path)
    if cfg.path.startswith("builtin:"):
        return load_tokenizer("builtin")
    return load_tokenizer(cfg.path)


def build_module(role: ModelRole, seed: int) -> torch.nn.Module | None:
    """The role's PackedTransformer with its head, or None for a weightless role."""
    if role.head == "none":
        return None
    from realflow.models.hf_io import init_from_actor, load_hf

    cfg = role.config
    overrides: dict[str, Any] = {"gradient_checkpointing": cfg.gradient_checkpointing}
    if cfg.path == BUILTIN_RANDOM:
        from realflow.data.tokenizer import load_tokenizer
        from realflow.models.builtin import builtin_config
        from realflow.models.transformer import PackedTransformer

        vocab = len(load_tokenizer("builtin"))
        torch.manual_seed(seed)
        return PackedTransformer(builtin_config("tiny-llama", vocab, **overrides), head=role.head)
    if cfg.path.startswith("builtin:"):
        raise ValueError(
            f"built-in model '{cfg.path}' must be resolved to a directory before workers start"
        )
    if role.head != "lm" and cfg.init_from_actor:
        return init_from_actor(cfg.path, head=role.head, seed=seed, **overrides).model
    return load_hf(cfg.path, head=role.head, load_tokenizer=False, **overrides).model


def build_model(
    name: str,
    role: ModelRole,
    trained: bool,
    total_train_steps: int,
    seed: int,
    dp_group: Any = None,
) -> Model:
    """A `Model` for interfaces: a train engine for trained roles, an inference engine otherwise."""
    from realflow.engines.train import InferenceEngine, build_train_engine

    module = build_module(role, seed)
    tokenizer = load_role_tokenizer(role)
    if module is None:
        engine = None
    elif trained:
        engine = build_train_engine(
            module, role.config.engine_config(), role.config.optimizer, total_train_steps, dp_group
        )
    else:
        module.requires_grad_(False)
        engine = InferenceEngine(module, role.config.engine_config())
    logger.info(
        "built %s (%s, head=%s, %s)",
        name,
        role.config.path,
        role.head,
        "train" if trained else "inference",
    )
    return Model(name=name, module=engine, tokenizer=tokenizer)
