"""Reward modelling: a pairwise Bradley-Terry loss on the last-token score of each answer."""

from __future__ import annotations

import dataclasses

from realflow.api.config import field_
from realflow.api.dfg import InterfaceType, MFCDef
from realflow.api.registry import EXPERIMENTS
from realflow.experiments.common import ExperimentConfig, ModelConfig, ModelRole, model_field


@EXPERIMENTS.register("rw")
@dataclasses.dataclass
class RWConfig(ExperimentConfig):
    """Trains `rew` on paired data (JSONL rows {"prompt", "chosen", "rejected"})."""

    rew: ModelConfig = model_field("builtin:reverse-sft", lr=3e-4, init_from_actor=True)
    total_steps: int = field_(150, "Iterations (steps) to run.", gt=0)
    n_seqs: int = field_(32, "Pairs per step.", gt=0)

    dataset_type = "paired"
    dataset_keys = ("packed_input_ids", "prompt_mask")

    def roles(self) -> dict[str, ModelRole]:
        return {"rew": ModelRole(self.rew, head="reward")}

    def mfcs(self) -> list[MFCDef]:
        keys = ("packed_input_ids", "prompt_mask")
        return [self.node("rew_train", "rew", InterfaceType.TRAIN_STEP, "paired_rw", inputs=keys)]
