"""`reinforce_pp_actor`: REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for
Aligning Large Language Models").

No critic and no group baseline: each token's reward is `-kl_beta * KL_t` (the `kl_estimator`
estimate of KL(pi_old || ref) at that token) plus, at the last answer token, the sequence's
score; the advantage is the reward-to-go (discount `gamma`), whitened over every answer token of
the batch (global batch normalisation). The loss is PPO's clipped surrogate, with no KL term.
`group_size` answers per prompt are scored independently. The rest is the shared critic-free
actor (see realflow.interfaces.policy).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from realflow.algorithms import masked_mean, reinforce_pp_advantages
from realflow.algorithms.kl import KL_ESTIMATORS
from realflow.api.data import SequenceSample
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import IDS, answer_mask_T1
from realflow.interfaces.dp_stats import dp_masked_whiten
from realflow.interfaces.policy import CriticFreeActor, PolicyArgs


@dataclasses.dataclass
class ReinforcePPArgs(PolicyArgs):
    """Keyword arguments of reinforce_pp_actor (see realflow.experiments.reinforce_pp)."""

    group_size: int = 1
    gamma: float = 1.0
    kl_estimator: str = "k1"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"reinforce_pp gamma ({self.gamma}) must be in [0, 1]")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"reinforce_pp kl_estimator {self.kl_estimator!r} unknown; "
                f"known: {sorted(KL_ESTIMATORS)}"
            )


@INTERFACES.register("reinforce_pp_actor")
class ReinforcePPActorInterface(CriticFreeActor):
    """generate: answers to packed_prompts; inference: `logprobs`; train_step: the REINFORCE++
    update, stats loss, pg_loss, reward/mean, kl, returns/mean..."""

    args_class = ReinforcePPArgs
    name = "reinforce_pp_actor"
    kl_in_loss = False  # the KL is in the token rewards

    def advantages(
        self, data: SequenceSample, dp_group: Any = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Reward-to-go of the KL-shaped token rewards, whitened over every answer token of the
        batch (of every rank of `dp_group`) ([T1], 0 off the answers)."""
        score_B, stats = self.scores(data)
        a, d = self.args, data.data
        cu_B1 = data.cu_seqlens(IDS)
        mask_T1 = answer_mask_T1(d["prompt_mask"], cu_B1)
        logp_T1 = d["logprobs"].float()
        ref_T1 = d["ref_logprobs"].float() if a.kl_beta > 0 else logp_T1
        _, ret_T1 = reinforce_pp_advantages(
            score_B, logp_T1, ref_T1, mask_T1, cu_B1, a.kl_beta, a.gamma, a.kl_estimator
        )
        # Whitened again: reinforce_pp_advantages saw this rank's part of the batch only.
        adv_T1 = dp_masked_whiten(ret_T1, mask_T1, dp_group)
        stats["returns/mean"] = float(masked_mean(ret_T1, mask_T1))
        if a.kl_beta > 0:
            stats["kl"] = float(masked_mean(logp_T1 - ref_T1, mask_T1))
        return adv_T1, stats
