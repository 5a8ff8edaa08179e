"""`reward`: scores answers with a weighted sum of named reward scorers (see scorers.py).

Built from the experiment's RewardConfig (`scorers`, `weights`, `args`). `inference` reads
packed_input_ids and prompt_mask and returns `rewards`, one float per sequence:
`sum_k weights[k] * scorer_k(...)` over the sequence-level scorers; with a dense (process)
scorer it also returns `dense_rewards` (L-1 per sequence, the layout of logprobs): each
answer token's weighted share of the step scores, 0 on prompt positions. A sequence's total
reward is `rewards + sum(dense_rewards)`.
"""

from __future__ import annotations

import math
from typing import Any

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
    shifted_seqlens,
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

    @property
    def dense(self) -> bool:
        """Whether any scorer gives per-step (dense) scores."""
        return any(is_dense(s) for s in self.scorers)

    def score_components(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, list[Any]]:
        """Each scorer's scores by scorer name: per sequence a float, or (dense scorers) a list
        with one value per answer token."""
        if self.needs_model and model.module is None:
            needing = [n for n, s in zip(self.names, self.scorers) if s.needs_model]
            raise ValueError(f"reward scorers {needing} need the weights of role '{model.name}'")
        prompts, answers, answer_ids = decode_prompts_answers(model.tokenizer, data)
        batch = ScoringBatch(
            prompts, answers, per_sequence_metadata(data), data, mb_spec, answer_ids
        )
        out: dict[str, list[Any]] = {}
        for name, scorer in zip(self.names, self.scorers):
            scores = scorer.score(batch, model)
            if is_dense(scorer):
                out[name] = dense_to_tokens(name, scores, batch, model.tokenizer)
            else:
                out[name] = check_scores(name, scores, len(answers))
        return out

    def _totals(self, components: dict[str, list[Any]]) -> tuple[list[float], list[list[float]]]:
        """(weighted sequence-level score, weighted per-answer-token dense scores) per
        sequence."""
        n = len(next(iter(components.values())))
        seq = [0.0] * n
        tok: list[list[float]] = [[] for _ in range(n)]
        for name, w, scorer in zip(self.names, self.weights, self.scorers):
            for i, value in enumerate(components[name]):
                if not is_dense(scorer):
                    seq[i] += w * value
                elif not tok[i]:
                    tok[i] = [w * v for v in value]
                else:
                    tok[i] = [a + w * v for a, v in zip(tok[i], value)]
        return seq, tok

    def evaluate(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> dict[str, float]:
        """`reward/mean` and `reward/std` of the weighted total score (dense steps summed), and
        each scorer's mean."""
        components = self.score_components(model, data, mb_spec)
        seq, tok = self._totals(components)
        total = torch.tensor([s + sum(t) for s, t in zip(seq, tok)], dtype=torch.float32)
        stats = {"reward/mean": float(total.mean()), "reward/std": float(total.std(correction=0))}
        for name, scorer in zip(self.names, self.scorers):
            totals = [sum(v) if is_dense(scorer) else v for v in components[name]]
            stats[f"reward/{name}/mean"] = sum(totals) / len(totals)
        return stats

    def inference(
        self, model: Model, data: SequenceSample, mb_spec: MicroBatchSpec
    ) -> SequenceSample:
        components = self.score_components(model, data, mb_spec)
        seq, tok = self._totals(components)
        device = data.data[IDS].device
        tensors = {"rewards": torch.tensor(seq, dtype=torch.float32, device=device)}
        seqlens = {"rewards": one_per_seq(data)}
        if self.dense:
            tensors["dense_rewards"] = dense_layout(data, tok).to(device)
            seqlens["dense_rewards"] = shifted_seqlens(data)
        return output_sample(data, tensors, seqlens)


def is_dense(scorer: object) -> bool:
    return bool(getattr(scorer, "dense", False))


def dense_to_tokens(
    name: str, scores: list[Any], batch: ScoringBatch, tokenizer: Any
) -> list[list[float]]:
    """A dense scorer's output as per-answer-token values. Per sequence it returns either one
    float per answer token, or step scores `[(end, score), ...]`: each step's score goes to the
    answer token that completes character `end` of the decoded answer."""
    if len(scores) != len(batch):
        raise ValueError(f"reward scorer '{name}' returned {len(scores)} entries for {len(batch)}")
    out = []
    for i, (entry, ids) in enumerate(zip(scores, batch.answer_ids)):
        entry = list(entry)
        if not entry or isinstance(entry[0], (tuple, list)):  # steps (none: nothing scored)
            out.append(steps_to_tokens(entry, ids, tokenizer))
        elif len(entry) == len(ids):
            out.append([float(x) for x in entry])
        else:
            raise ValueError(
                f"reward scorer '{name}' (dense) gave sequence {i} {len(entry)} per-token "
                f"scores for {len(ids)} answer tokens; return one per token or (end, score) steps"
            )
        if not all(math.isfinite(x) for x in out[-1]):
            raise ValueError(f"reward scorer '{name}' returned non-finite scores (sequence {i})")
    return out


def steps_to_tokens(steps: list[Any], ids: list[int], tokenizer: Any) -> list[float]:
    """Step scores `(char_end, score)` placed on the answer tokens that complete them."""
    ends = [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    out = [0.0] * max(1, len(ids))
    for end, score in steps:
        k = next((j for j, e in enumerate(ends) if e >= end), len(out) - 1)
        out[k] += float(score)
    return out[: len(ids)] if ids else out


def dense_layout(data: SequenceSample, per_token: list[list[float]]) -> torch.Tensor:
    """Per-answer-token values in the T1 layout of `data` (L-1 per sequence, zeros on prompt
    positions and on trailing EOS tokens): token j of the answer is predicted at T1 position
    n_prompt + j - 1."""
    cu = data.cu_seqlens(IDS).tolist()
    prompt_mask = data.data["prompt_mask"].bool().tolist()
    chunks = []
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        n_prompt = sum(prompt_mask[a:b])
        row = [0.0] * (b - a - 1)
        for j, v in enumerate(per_token[i]):
            row[n_prompt + j - 1] = v
        chunks.append(torch.tensor(row, dtype=torch.float32))
    return torch.cat(chunks)
