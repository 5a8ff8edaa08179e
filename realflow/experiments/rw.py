"""Reward modelling: a pairwise loss (Bradley-Terry by default) on the last-token score of each
answer."""

from __future__ import annotations

import dataclasses

from realflow.api.config import field_
from realflow.api.dfg import InterfaceType, MFCDef
from realflow.api.registry import EXPERIMENTS, RW_LOSSES
from realflow.experiments.common import ExperimentConfig, ModelConfig, ModelRole, model_field
from realflow.experiments.losses import ANSWER_KEYS, loss_problems


@dataclasses.dataclass
class RWHyperparameters:
    loss: str = field_(
        "bradley_terry",
        "Pairwise loss, a name in RW_LOSSES: 'bradley_terry' or your own, "
        "fn(RWLossInput) -> loss_P (see realflow.interfaces.losses).",
    )

    def validate(self) -> list[str]:
        return loss_problems(RW_LOSSES, self.loss)


@EXPERIMENTS.register("rw")
@dataclasses.dataclass
class RWConfig(ExperimentConfig):
    """Trains `rew` on paired data (JSONL rows {"prompt", "chosen", "rejected"}, or chosen and
    rejected conversations)."""

    rew: ModelConfig = model_field("builtin:reverse-sft", lr=3e-4, init_from_actor=True)
    total_steps: int = field_(150, "Iterations (steps) to run.", gt=0)
    n_seqs: int = field_(32, "Pairs per step.", gt=0)
    rw: RWHyperparameters = dataclasses.field(default_factory=RWHyperparameters)

    dataset_type = "paired"
    dataset_keys = ANSWER_KEYS

    def roles(self) -> dict[str, ModelRole]:
        return {"rew": ModelRole(self.rew, head="reward")}

    def mfcs(self) -> list[MFCDef]:
        train, args = InterfaceType.TRAIN_STEP, {"loss": self.rw.loss}
        return [self.node("rew_train", "rew", train, "paired_rw", args, ANSWER_KEYS)]
