"""Building a role's model on a worker: weights (HF directory or built-in), tokenizer, engine."""

from __future__ import annotations

import logging
from typing import Any

import torch

from realflow.api.interface import Model
from realflow.experiments.common import ModelRole

logger = logging.getLogger(__name__)

BUILTIN_RANDOM = "builtin:tiny"
CPU = torch.device("cpu")


def load_role_tokenizer(role: ModelRole) -> Any:
    from realflow.data.tokenizer import load_tokenizer

    cfg = role.config
    if cfg.tokenizer_path:
        return load_tokenizer(cfg.tokenizer_path)
    if cfg.path.startswith("builtin:"):
        return load_tokenizer("builtin")
    return load_tokenizer(cfg.path)


def build_module(
    role: ModelRole,
    seed: int,
    dtype: torch.dtype | None = None,
    device: torch.device = CPU,
) -> torch.nn.Module | None:
    """The role's PackedTransformer with its head on `device`, or None for a weightless role.
    The weights are in `dtype`, by default the checkpoint's (a random built-in model is fp32,
    initialised on the CPU so that every device starts from the same weights)."""
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
        model = PackedTransformer(builtin_config("tiny-llama", vocab, **overrides), head=role.head)
        return model.to(device=device, dtype=dtype)
    if cfg.path.startswith("builtin:"):
        raise ValueError(
            f"built-in model '{cfg.path}' must be resolved to a directory before workers start"
        )
    if role.head != "lm" and cfg.init_from_actor:
        return init_from_actor(
            cfg.path, head=role.head, seed=seed, dtype=dtype, device=device, **overrides
        ).model
    return load_hf(
        cfg.path, head=role.head, dtype=dtype, device=device, load_tokenizer=False, **overrides
    ).model


def weights_dtype(role: ModelRole, trained: bool, device: torch.device = CPU) -> torch.dtype | None:
    """The dtype a role's weights are built in (None: the checkpoint's).

    Trained roles arrive in the checkpoint's dtype and their engine upcasts them to fp32 master
    weights (and saves them back in that dtype by default). Roles never trained, under bf16
    compute (the default on a GPU), are held in bf16 on a GPU (2 bytes per parameter) and in
    the checkpoint's dtype on CPU; without bf16 they are upcast to fp32, so that they compute
    what an fp32 trained role computes. The frozen base weights of a role trained with
    adapters follow the never-trained rule (its adapters are fp32 masters).
    """
    fully_trained = trained and role.config.adapters() is None
    if fully_trained:
        return None
    if not role.config.resolved_bf16(device.type):
        return torch.float32
    return torch.bfloat16 if device.type == "cuda" else None


def build_model(
    name: str,
    role: ModelRole,
    trained: bool,
    total_train_steps: int,
    seed: int,
    dp_group: Any = None,
    device: torch.device = CPU,
    base_owner: Model | None = None,
) -> Model:
    """A `Model` for interfaces: a train engine for trained roles (with the role's adapters
    injected first, if any), an inference engine otherwise; with `base_owner` (the model
    `role.config.base_of` names), an engine over that model's base weights."""
    from realflow.engines.train import InferenceEngine, build_train_engine

    if role.config.base_of:
        from realflow.engines.tuners import BaseWeightsEngine

        assert base_owner is not None, f"{name}: build {role.config.base_of} first"
        logger.info("built %s as the base weights of %s on %s", name, role.config.base_of, device)
        engine = BaseWeightsEngine(base_owner.module, role.config.base_of)
        return Model(name=name, module=engine, tokenizer=base_owner.tokenizer)
    module = build_module(role, seed, weights_dtype(role, trained, device), device)
    tokenizer = load_role_tokenizer(role)
    if module is None:
        engine = None
    elif trained:
        spec = role.config.adapters()
        if spec is not None:
            from realflow.engines.tuners import apply_adapters

            apply_adapters(module, spec, seed, role.config.path)
        engine = build_train_engine(
            module,
            role.config.engine_config(device.type),
            role.config.optimizer,
            total_train_steps,
            dp_group,
        )
    else:
        module.requires_grad_(False)
        engine = InferenceEngine(module, role.config.engine_config(device.type))
    logger.info(
        "built %s (%s, head=%s, %s) on %s",
        name,
        role.config.path,
        role.head,
        "train" if trained else "inference",
        device if module is not None else "no device (no weights)",
    )
    return Model(name=name, module=engine, tokenizer=tokenizer)
