"""`rloo_actor`: RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs").

k answers per prompt; each answer's advantage is its score minus the mean score of the other
k - 1 answers to the same prompt (the leave-one-out baseline), the same for all its tokens. The
KL to the reference goes into the reward (`kl_in_reward`: score - kl_beta * sum over answer
tokens of the `kl_estimator` estimate, before the baseline, as in the paper and TRL's
RLOOTrainer) or into the loss (a kl_beta * k3 term, as GRPO). The rest is the shared critic-free
actor (see realflow.interfaces.policy).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from realflow.algorithms import broadcast_to_tokens, rloo_advantages, sequence_kl
from realflow.algorithms.kl import KL_ESTIMATORS
from realflow.api.data import SequenceSample
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import IDS, answer_mask_T1
from realflow.interfaces.policy import CriticFreeActor, PolicyArgs


@dataclasses.dataclass
class RLOOArgs(PolicyArgs):
    """Keyword arguments of rloo_actor (see realflow.experiments.rloo for the docs)."""

    kl_in_reward: bool = True
    kl_estimator: str = "k1"

    def __post_init__(self) -> None:
        super().__post_init__()
        # group_size 1 is allowed: generation alone (the evaluation's greedy answers) needs no
        # baseline; advantages() refuses groups of fewer than 2.
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"rloo kl_estimator {self.kl_estimator!r} unknown; known: {sorted(KL_ESTIMATORS)}"
            )


@INTERFACES.register("rloo_actor")
class RLOOActorInterface(CriticFreeActor):
    """generate: k answers per prompt in one sample; inference: `logprobs`; train_step: the
    RLOO update, stats loss, pg_loss, reward/mean, kl_reward/mean (kl_in_reward)..."""

    args_class = RLOOArgs
    name = "rloo_actor"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.kl_in_loss = not self.args.kl_in_reward

    def advantages(
        self, data: SequenceSample, dp_group: Any = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Leave-one-out advantages of the (KL-penalised) shaped scores on answer tokens (within
        each prompt's group: nothing gathers over `dp_group`)."""
        score_B, stats = self.scores(data)
        cu_B1 = data.cu_seqlens(IDS)
        mask_T1 = answer_mask_T1(data.data["prompt_mask"], cu_B1)
        a, d = self.args, data.data
        if a.kl_in_reward and a.kl_beta > 0:
            kl_B = sequence_kl(
                d["logprobs"].float(), d["ref_logprobs"].float(), mask_T1, cu_B1, a.kl_estimator
            )
            score_B = score_B - a.kl_beta * kl_B
            stats["kl_reward/mean"] = float((-a.kl_beta * kl_B).mean())
        adv_B = rloo_advantages(score_B, self.group_sizes(data))
        stats["advantages/abs_mean"] = float(adv_B.abs().mean())
        return broadcast_to_tokens(adv_B, mask_T1, cu_B1), stats
