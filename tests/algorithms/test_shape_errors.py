"""Every shape check of realflow.algorithms names both tensors by their parameter names and gives
both shapes, so a caller sees which argument is wrong. (Mutation testing found that no test read
these messages: a check that named the wrong tensor passed the suite.)"""

from __future__ import annotations

import re

import pytest
import torch

from realflow.algorithms import (
    RunningMeanStd,
    aggregate_loss,
    discounted_returns,
    dpo_loss,
    gae_packed,
    kl_estimate,
    kl_shaped_rewards,
    masked_sum,
    pairwise_rw_loss,
    policy_loss,
    ppo_actor_loss,
    ppo_critic_loss,
    ppo_surrogate,
    process_scores,
    reinforce_pp_advantages,
    sequence_kl,
    sequence_logprobs,
)

# One sequence of 4 tokens: 3 positions in the shifted T1 space. Every case passes a length-3
# tensor as the first named argument and a length-4 one as the second.
CU = torch.tensor([0, 4])
T3, T4 = torch.zeros(3), torch.zeros(4)
M3, M4 = torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
S1, NO_EOS = torch.zeros(1), torch.zeros(1, dtype=torch.bool)

CASES = {
    "gae values": (
        lambda: gae_packed(T3, T4, CU, S1, 1.0, 1.0, M3),
        ("rewards_T1", "values_T1"),
    ),
    "gae mask": (lambda: gae_packed(T3, T3, CU, S1, 1.0, 1.0, M4), ("rewards_T1", "loss_mask_T1")),
    "kl_estimate": (lambda: kl_estimate(T3, T4), ("logprobs_T1", "ref_logprobs_T1")),
    "process_scores": (
        lambda: process_scores(S1, torch.zeros(2, dtype=torch.bool)),
        ("score_B", "no_eos_mask_B"),
        (1, 2),
    ),
    "kl_shaped mask": (
        lambda: kl_shaped_rewards(S1, T3, T3, M4, CU, 0.1, NO_EOS),
        ("logprobs_T1", "loss_mask_T1"),
    ),
    "kl_shaped ref": (
        lambda: kl_shaped_rewards(S1, T3, T4, M3, CU, 0.1, NO_EOS),
        ("logprobs_T1", "ref_logprobs_T1"),
    ),
    "masked_sum": (lambda: masked_sum(T3, M4), ("x", "mask")),
    "RunningMeanStd.update": (lambda: RunningMeanStd().update(T3, M4), ("x", "mask")),
    "sequence_logprobs": (
        lambda: sequence_logprobs(T3, M4, CU),
        ("logprobs_T1", "loss_mask_T1"),
    ),
    "sequence_kl": (lambda: sequence_kl(T3, T3, M4, CU), ("logprobs_T1", "loss_mask_T1")),
    "discounted_returns": (
        lambda: discounted_returns(T3, M4, CU),
        ("rewards_T1", "loss_mask_T1"),
    ),
    "reinforce_pp ref": (
        lambda: reinforce_pp_advantages(S1, T3, T4, M3, CU, 0.1),
        ("logprobs_T1", "ref_logprobs_T1"),
    ),
    "reinforce_pp mask": (
        lambda: reinforce_pp_advantages(S1, T3, T3, M4, CU, 0.1),
        ("logprobs_T1", "loss_mask_T1"),
    ),
    "ppo_surrogate old": (
        lambda: ppo_surrogate(T3, T4, T3, 0.2),
        ("logprobs_T1", "old_logprobs_T1"),
    ),
    "ppo_surrogate adv": (
        lambda: ppo_surrogate(T3, T3, T4, 0.2),
        ("logprobs_T1", "advantages_T1"),
    ),
    "ppo_actor_loss": (
        lambda: ppo_actor_loss(T3, T3, T3, M4, 0.2),
        ("logprobs_T1", "loss_mask_T1"),
    ),
    "critic old": (lambda: ppo_critic_loss(T3, T4, T3, M3), ("values_T1", "old_values_T1")),
    "critic returns": (lambda: ppo_critic_loss(T3, T3, T4, M3), ("values_T1", "returns_T1")),
    "critic mask": (lambda: ppo_critic_loss(T3, T3, T3, M4), ("values_T1", "loss_mask_T1")),
    "aggregate_loss": (
        lambda: aggregate_loss(T3, M4, CU, "dapo"),
        ("x_T1", "loss_mask_T1"),
    ),
    "policy_loss": (
        lambda: policy_loss(T3, T3, T3, M4, CU, 0.2),
        ("logprobs_T1", "loss_mask_T1"),
    ),
    "dpo pi_rejected": (
        lambda: dpo_loss(T3, T4, T3, T3, 0.1),
        ("pi_chosen_logps_B", "pi_rejected_logps_B"),
    ),
    "dpo ref_chosen": (
        lambda: dpo_loss(T3, T3, T4, T3, 0.1),
        ("pi_chosen_logps_B", "ref_chosen_logps_B"),
    ),
    "dpo ref_rejected": (
        lambda: dpo_loss(T3, T3, T3, T4, 0.1),
        ("pi_chosen_logps_B", "ref_rejected_logps_B"),
    ),
    "pairwise_rw_loss": (
        lambda: pairwise_rw_loss(T3, T4),
        ("chosen_scores_P", "rejected_scores_P"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shape_error_names_both_tensors(case):
    call, (name_a, name_b), *lens = CASES[case]
    n_a, n_b = lens[0] if lens else (3, 4)
    want = f"^{re.escape(f'{name_a} shape ({n_a},) != {name_b} shape ({n_b},)')}$"
    with pytest.raises(ValueError, match=want):
        call()


# Two sequences of 4 and 3 tokens: 3 + 2 = 5 positions in the shifted T1 space.
CU2 = torch.tensor([0, 4, 7])
T5, T6 = torch.zeros(5), torch.zeros(6)
M5, M6 = torch.ones(5, dtype=torch.bool), torch.ones(6, dtype=torch.bool)
S2, NO_EOS2 = torch.zeros(2), torch.zeros(2, dtype=torch.bool)

LENGTH_CASES = {
    "kl_shaped T1": (
        lambda: kl_shaped_rewards(S2, T6, T6, M6, CU2, 0.1, NO_EOS2),
        "logprobs_T1 has 6 entries and score_B shape (2,); "
        "cu_seqlens_B1 describes 5 T1 positions in 2 sequences",
    ),
    "kl_shaped score": (
        lambda: kl_shaped_rewards(S1, T5, T5, M5, CU2, 0.1, NO_EOS),
        "logprobs_T1 has 5 entries and score_B shape (1,); "
        "cu_seqlens_B1 describes 5 T1 positions in 2 sequences",
    ),
    "reinforce_pp score": (
        lambda: reinforce_pp_advantages(S1, T5, T5, M5, CU2, 0.1),
        "score_B has shape (1,); cu_seqlens_B1 describes 2 sequences",
    ),
    "aggregate_loss T1": (
        lambda: aggregate_loss(T6, M6, CU2, "dapo"),
        "x_T1 has 6 entries, cu_seqlens_B1 describes 5",
    ),
    "gae T1": (
        lambda: gae_packed(T6, T6, CU2, S2, 1.0, 1.0, M6),
        "rewards_T1 has 6 entries and bootstrap_B shape (2,); "
        "cu_seqlens_B1 describes 5 T1 positions in 2 sequences",
    ),
    "gae bootstrap": (
        lambda: gae_packed(T5, T5, CU2, S1, 1.0, 1.0, M5),
        "rewards_T1 has 5 entries and bootstrap_B shape (1,); "
        "cu_seqlens_B1 describes 5 T1 positions in 2 sequences",
    ),
}


@pytest.mark.parametrize("case", sorted(LENGTH_CASES))
def test_length_error_gives_both_sides(case):
    """Tensors that disagree with cu_seqlens_B1 are refused with every length involved."""
    call, message = LENGTH_CASES[case]
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call()
