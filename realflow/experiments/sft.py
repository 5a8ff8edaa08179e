"""Supervised fine-tuning: one train_step MFC on the actor, loss on answer tokens only."""

from __future__ import annotations

import dataclasses
from typing import Any

from realflow.api.config import field_
from realflow.api.dfg import InterfaceType, MFCDef
from realflow.api.registry import EXPERIMENTS, SFT_LOSSES
from realflow.experiments.common import ExperimentConfig, ModelConfig, ModelRole, model_field
from realflow.experiments.losses import (
    answer_keys,
    loss_problems,
    loss_scale_args_field,
    loss_scale_field,
    loss_scale_kwargs,
    loss_scale_problems,
)


@dataclasses.dataclass
class SFTHyperparameters:
    loss: str = field_(
        "nll",
        "Per-token loss, a name in SFT_LOSSES: 'nll' (cross entropy) or your own, "
        "fn(TokenLossInput) -> loss_T1 (see realflow.interfaces.losses).",
    )
    loss_scale: str = loss_scale_field()
    loss_scale_args: dict[str, Any] = loss_scale_args_field()

    def validate(self) -> list[str]:
        return loss_problems(SFT_LOSSES, self.loss) + loss_scale_problems(
            self.loss_scale, self.loss_scale_args
        )


@EXPERIMENTS.register("sft")
@dataclasses.dataclass
class SFTConfig(ExperimentConfig):
    """SFT on prompt-answer data (JSONL rows {"prompt", "answer"} or {"messages"})."""

    actor: ModelConfig = model_field("builtin:tiny", lr=3e-3)
    sft: SFTHyperparameters = dataclasses.field(default_factory=SFTHyperparameters)

    dataset_type = "prompt_answer"

    @property
    def dataset_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return answer_keys(self.sft.loss_scale)

    def dataset_kwargs(self) -> dict[str, Any]:
        s = self.sft
        return {**super().dataset_kwargs(), **loss_scale_kwargs(s.loss_scale, s.loss_scale_args)}

    def roles(self) -> dict[str, ModelRole]:
        return {"actor": ModelRole(self.actor, head="lm")}

    def mfcs(self) -> list[MFCDef]:
        train = InterfaceType.TRAIN_STEP
        args = {"loss": self.sft.loss}
        return [self.node("actor_train", "actor", train, "sft", args, self.dataset_keys)]
