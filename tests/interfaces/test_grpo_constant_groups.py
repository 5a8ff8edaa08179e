"""grpo_actor (and rloo_actor): a group whose answers all get the same reward has zero advantage
on every token.

Before the fix, an all-correct group of 8 scored 1.0 with reward_output_scaling=0.7 got +0.056
on every answer token (the float32 group mean of 8 x 0.7 is not 0.7)."""

from __future__ import annotations

import pytest
import torch

from realflow.api.data import SequenceSample
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import answer_mask_T1


def rollout_sample(rewards: list[list[float]], prompt_len: int = 3, answer_len: int = 4):
    """A hand-built rollout: one sample per group, `len(group)` sequences of prompt + answer."""
    ids, masks, no_eos, rews = [], [], [], []
    for g in rewards:
        n = prompt_len + answer_len
        ids.append([torch.arange(5, 5 + n) for _ in g])
        masks.append([torch.tensor([True] * prompt_len + [False] * answer_len) for _ in g])
        no_eos.append([torch.tensor([False]) for _ in g])
        rews.append([torch.tensor([r], dtype=torch.float32) for r in g])
    return SequenceSample.from_sequences(
        list(range(len(rewards))),
        {"packed_input_ids": ids, "prompt_mask": masks, "no_eos_mask": no_eos, "rewards": rews},
    )


@pytest.mark.parametrize("scale", [1.0, 0.7, 0.3])
@pytest.mark.parametrize("group_size", [2, 5, 8, 16])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_all_equal_group_has_zero_advantages(scale, group_size, scale_rewards):
    grpo = INTERFACES.get("grpo_actor")(
        group_size=group_size, reward_output_scaling=scale, scale_rewards=scale_rewards
    )
    groups = [[v] * group_size for v in (1.0, 2.9, 0.1, 0.7, -3.3)]
    adv_T1, stats = grpo.advantages(rollout_sample(groups))
    assert torch.count_nonzero(adv_T1) == 0, adv_T1[adv_T1 != 0][:5]
    assert stats["advantages/abs_mean"] == 0.0


def test_equal_groups_stay_zero_next_to_a_mixed_group():
    grpo = INTERFACES.get("grpo_actor")(group_size=4, reward_output_scaling=0.7)
    data = rollout_sample([[1.0] * 4, [0.0, 1.0, 0.5, 1.0], [0.1] * 4])
    adv_T1, _ = grpo.advantages(data)
    cu = data.cu_seqlens("packed_input_ids")
    mask = answer_mask_T1(data.data["prompt_mask"], cu)
    shifted = [n - 1 for n in data.flat_seqlens("packed_input_ids")]  # L-1 per sequence
    per_seq, seq_masks = adv_T1.split(shifted), mask.split(shifted)
    mixed = torch.tensor([0.0, 1.0, 0.5, 1.0], dtype=torch.float64) * 0.7
    want = (mixed - mixed.mean()) / (mixed.std() + 1e-6)
    for j, (a, m) in enumerate(zip(per_seq, seq_masks)):
        assert torch.count_nonzero(a[~m]) == 0
        if j < 4 or j >= 8:
            assert torch.count_nonzero(a) == 0, j
        else:
            torch.testing.assert_close(a[m].double(), want[j - 4].expand(int(m.sum())))


@pytest.mark.parametrize("scale", [1.0, 0.7, 0.3])
@pytest.mark.parametrize("group_size", [2, 5, 8, 16])
def test_rloo_all_equal_group_has_zero_advantages(scale, group_size):
    rloo = INTERFACES.get("rloo_actor")(
        group_size=group_size, reward_output_scaling=scale, kl_beta=0.0
    )
    groups = [[v] * group_size for v in (1.0, 2.9, 0.1, 0.7, -3.3)]
    adv_T1, stats = rloo.advantages(rollout_sample(groups))
    assert torch.count_nonzero(adv_T1) == 0, adv_T1[adv_T1 != 0][:5]
