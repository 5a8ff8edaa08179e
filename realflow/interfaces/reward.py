"""`reward`: scores answers with a weighted sum of named reward scorers (see scorers.py).

Built from the experiment's RewardConfig (`scorers`, `weights`, `args`). `inference` reads
packed_input_ids and prompt_mask and returns `rewards`, one float per sequence:
`sum_k weights[k] * scorer_k(...)`.
"""

from __future__ import annotations

import torch

from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model, ModelInterface
from realflow.api.registry import INTERFACES, REWARD_SCORERS
from realflow.interfaces.common import (
    IDS,
    decode_prompts_answers,
    one_per_seq,
    output_sample,
    per_sequence_metadata,
)
from realflow.interfaces.scorers import ScoringBatch, check_scores


@INTERFACES.register("reward")
class RewardInterface(ModelInterface):
    """inference: `rewards` = weighted sum of the scorers' scores of each answer."""

    def __init__(
        self,
        scorers: list[str],
        weights: list[float] | None = None,
        args: dict[str, str] | None = None,
    ):
        if not scorers:
            raise ValueError("reward: name at least one reward scorer")
        weights = list(weights or [1.0] * len(scorers))
        if len(weights) != len(scorers):
            raise ValueError(f"reward: {len(weights)} weights for {len(scorers)} scorers {scorers}")
        args = dict(args or {})
        classes = [REWARD_SCORERS.get(name) for name in scorers]
        declared = {a: n for n, c in zip(scorers, classes) for a in c.args}
        unknown = sorted(set(args) - set(declared))
        if unknown:
            known = "; ".join(
                f"{n}: {', '.join(c.args) or '(none)'}" for n, c in zip(scorers, classes)
            )
            raise ValueError(
                f"reward: unknown scorer arguments {unknown}; known per scorer: {known}"
            )
        self.names = list(scorers)
        self.weights = [float(w) for w in weights]
        self.scorers = [c(**{k: v for k, v in args.items() if k in c.args}) for c in classes]

    @property
    def needs_model(self) -> bool:
        return any(s.needs_model for s in self.scorers)

    def score_components(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, list[float]]:
        """Each scorer's scores of every sequence, by scorer name."""
        if self.needs_model and model.module is None:
            needing = [n for n, s in zip(self.names, self.scorers) if s.needs_model]
            raise ValueError(f"reward scorers {needing} need the weights of role '{model.name}'")
        prompts, answers, _ = decode_prompts_answers(model.tokenizer, data)
        batch = ScoringBatch(prompts, answers, per_sequence_metadata(data), data, mb_spec)
        return {
            name: check_scores(name, scorer.score(batch, model), len(answers))
            for name, scorer in zip(self.names, self.scorers)
        }

    def evaluate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        """`reward/mean` and `reward/std` of the weighted score, and each scorer's mean."""
        components = self.score_components(model, data, mb_spec)
        total = torch.zeros(len(data.flat_seqlens(IDS)))
        for w, scores in zip(self.weights, components.values()):
            total += w * torch.tensor(scores, dtype=torch.float32)
        stats = {"reward/mean": float(total.mean()), "reward/std": float(total.std(correction=0))}
        for name, scores in components.items():
            stats[f"reward/{name}/mean"] = sum(scores) / len(scores)
        return stats

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        components = self.score_components(model, data, mb_spec)
        total = torch.zeros(len(data.flat_seqlens(IDS)))
        for w, scores in zip(self.weights, components.values()):
            total += w * torch.tensor(scores, dtype=torch.float32)
        total = total.to(data.data[IDS].device)
        return output_sample(data, {"rewards": total}, {"rewards": one_per_seq(data)})
