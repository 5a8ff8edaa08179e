"""`grpo_actor`: GRPO with group-normalised advantages and a k3 KL-to-reference loss term.

Its options cover Dr. GRPO (`scale_rewards="none"`, `loss_type="dr_grpo"`) and DAPO's actor
(`eps_clip_high` above `eps_clip`, `loss_type="dapo"`, overlong shaping, `kl_beta=0`); the rest
is the shared critic-free actor (see realflow.interfaces.policy for the keys and the layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from realflow.algorithms import (
    batch_scaled_advantages,
    broadcast_to_tokens,
    group_normalized_advantages,
)
from realflow.api.data import SequenceSample
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import IDS, answer_mask_T1
from realflow.interfaces.dp_stats import dp_all
from realflow.interfaces.policy import CriticFreeActor, PolicyArgs

SCALE_REWARDS = ("group", "batch", "none")  # TRL GRPOConfig.scale_rewards names


@dataclasses.dataclass
class GRPOArgs(PolicyArgs):
    """Keyword arguments of grpo_actor (see realflow.experiments.grpo for the docs)."""

    scale_rewards: str = "group"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(
                f"grpo scale_rewards {self.scale_rewards!r} unknown; known: {', '.join(SCALE_REWARDS)}"
            )


@INTERFACES.register("grpo_actor")
class GRPOActorInterface(CriticFreeActor):
    """generate: `group_size` answers per prompt in one sample; inference: `logprobs`;
    train_step: GRPO update with stats loss, pg_loss, ref_kl, clip_frac, reward/mean..."""

    args_class = GRPOArgs
    name = "grpo_actor"

    def advantages(
        self, data: SequenceSample, dp_group: Any = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Group-centred shaped scores, divided by the group's std ("group"), the batch's
        ("batch": every dp rank's scores) or nothing ("none"), on answer tokens ([T1]); and
        reward statistics."""
        score_B, stats = self.scores(data)
        sizes = self.group_sizes(data)
        if self.args.scale_rewards == "batch":
            adv_B = batch_scaled_advantages(
                score_B, sizes, batch_scores_B=dp_all(score_B, dp_group)
            )
        else:
            adv_B = group_normalized_advantages(score_B, sizes, self.args.scale_rewards == "group")
        stats["advantages/abs_mean"] = float(adv_B.abs().mean())
        cu_B1 = data.cu_seqlens(IDS)
        mask_T1 = answer_mask_T1(data.data["prompt_mask"], cu_B1)
        return broadcast_to_tokens(adv_B, mask_T1, cu_B1), stats
