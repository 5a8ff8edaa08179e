"""Supervised fine-tuning: one train_step MFC on the actor, loss on answer tokens only."""

from __future__ import annotations

import dataclasses

from realflow.api.dfg import InterfaceType, MFCDef
from realflow.api.registry import EXPERIMENTS
from realflow.experiments.common import ExperimentConfig, ModelConfig, ModelRole, model_field


@EXPERIMENTS.register("sft")
@dataclasses.dataclass
class SFTConfig(ExperimentConfig):
    """SFT on prompt-answer data (JSONL rows {"prompt", "answer"})."""

    actor: ModelConfig = model_field("builtin:tiny", lr=3e-3)

    dataset_type = "prompt_answer"
    dataset_keys = ("packed_input_ids", "prompt_mask")

    def roles(self) -> dict[str, ModelRole]:
        return {"actor": ModelRole(self.actor, head="lm")}

    def mfcs(self) -> list[MFCDef]:
        keys = ("packed_input_ids", "prompt_mask")
        return [self.node("actor_train", "actor", InterfaceType.TRAIN_STEP, "sft", inputs=keys)]
