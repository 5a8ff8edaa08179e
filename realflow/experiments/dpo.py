"""DPO: a ref inference MFC feeds the actor's training with reference log-probabilities."""

from __future__ import annotations

import dataclasses

from realflow.api.config import field_
from realflow.api.dfg import InterfaceType, MFCDef
from realflow.api.registry import EXPERIMENTS
from realflow.experiments.common import (
    SAME_AS_ACTOR,
    ExperimentConfig,
    ModelConfig,
    ModelRole,
    interface_args,
    model_field,
)


@dataclasses.dataclass
class DPOHyperparameters:
    beta: float = field_(0.1, "Strength of the implicit KL to the reference.", gt=0.0)
    loss_type: str = field_("sigmoid", "DPO (sigmoid) or IPO loss.", choices=("sigmoid", "ipo"))
    label_smoothing: float = field_(
        0.0, "Conservative DPO: assumed label noise in [0, 0.5).", ge=0.0
    )

    def validate(self) -> list[str]:
        if self.label_smoothing >= 0.5:
            return [f"label_smoothing ({self.label_smoothing}) must be < 0.5"]
        return []


@EXPERIMENTS.register("dpo")
@dataclasses.dataclass
class DPOConfig(ExperimentConfig):
    """DPO on paired data (JSONL rows {"prompt", "chosen", "rejected"})."""

    actor: ModelConfig = model_field("builtin:reverse-sft", lr=5e-4)
    ref: ModelConfig = model_field(SAME_AS_ACTOR)
    dpo: DPOHyperparameters = dataclasses.field(default_factory=DPOHyperparameters)

    dataset_type = "paired"
    dataset_keys = ("packed_input_ids", "prompt_mask")

    def roles(self) -> dict[str, ModelRole]:
        return {"actor": ModelRole(self.actor, head="lm"), "ref": ModelRole(self.ref, head="lm")}

    def mfcs(self) -> list[MFCDef]:
        args = interface_args(self.dpo)
        keys = ("packed_input_ids", "prompt_mask")
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
