"""DPO: a ref inference MFC feeds the actor's training with reference log-probabilities."""

from __future__ import annotations

import dataclasses
from typing import Any

from realflow.api.config import field_
from realflow.api.dfg import InterfaceType, MFCDef
from realflow.api.registry import DPO_LOSSES, EXPERIMENTS
from realflow.experiments.common import (
    SAME_AS_ACTOR,
    ExperimentConfig,
    ModelConfig,
    ModelRole,
    model_field,
)
from realflow.experiments.losses import (
    answer_keys,
    loss_problems,
    loss_scale_args_field,
    loss_scale_field,
    loss_scale_kwargs,
    loss_scale_problems,
)


@dataclasses.dataclass
class DPOHyperparameters:
    beta: float = field_(0.1, "Strength of the implicit KL to the reference.", gt=0.0)
    loss: str = field_(
        "sigmoid",
        "Pair loss, a name in DPO_LOSSES: 'sigmoid' (DPO), 'ipo', or your own, "
        "fn(DPOLossInput) -> loss_P (see realflow.interfaces.losses).",
    )
    label_smoothing: float = field_(
        0.0, "Conservative DPO: assumed label noise in [0, 0.5).", ge=0.0
    )
    loss_scale: str = loss_scale_field()
    loss_scale_args: dict[str, Any] = loss_scale_args_field()

    def validate(self) -> list[str]:
        problems = loss_problems(DPO_LOSSES, self.loss)
        problems += loss_scale_problems(self.loss_scale, self.loss_scale_args)
        if self.label_smoothing >= 0.5:
            problems.append(f"label_smoothing ({self.label_smoothing}) must be < 0.5")
        return problems

    def interface_args(self) -> dict[str, Any]:
        return {"beta": self.beta, "loss": self.loss, "label_smoothing": self.label_smoothing}


@EXPERIMENTS.register("dpo")
@dataclasses.dataclass
class DPOConfig(ExperimentConfig):
    """DPO on paired data (JSONL rows {"prompt", "chosen", "rejected"}, or chosen and rejected
    conversations)."""

    actor: ModelConfig = model_field("builtin:reverse-sft", lr=5e-4)
    ref: ModelConfig = model_field(SAME_AS_ACTOR)
    dpo: DPOHyperparameters = dataclasses.field(default_factory=DPOHyperparameters)

    dataset_type = "paired"

    @property
    def dataset_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return answer_keys(self.dpo.loss_scale)

    def dataset_kwargs(self) -> dict[str, Any]:
        d = self.dpo
        return {**super().dataset_kwargs(), **loss_scale_kwargs(d.loss_scale, d.loss_scale_args)}

    def roles(self) -> dict[str, ModelRole]:
        return {"actor": ModelRole(self.actor, head="lm"), "ref": ModelRole(self.ref, head="lm")}

    def mfcs(self) -> list[MFCDef]:
        args = self.dpo.interface_args()
        keys = self.dataset_keys
        inf, train = InterfaceType.INFERENCE, InterfaceType.TRAIN_STEP
        return [
            self.node(
                "ref_inf",
                "ref",
                inf,
                "dpo",
                args,
                keys,
                ("ref_seqlogp",),
                {"seqlogp": "ref_seqlogp"},
            ),
            self.node("actor_train", "actor", train, "dpo", args, (*keys, "ref_seqlogp")),
        ]
