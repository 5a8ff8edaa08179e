"""grpo_actor: one sample holds its group; group-normalised advantages; a train step."""

from __future__ import annotations

import math

import pytest
import torch
from iface_testutils import MB, changed, copy_params, dataset_batch, inference_model, train_model

from realflow.api.data import SequenceSample
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import answer_mask_T1

GROUP = 3


def grpo_args(**changes):
    from realflow.experiments.common import interface_args
    from realflow.experiments.grpo import GRPOHyperparameters

    args = interface_args(GRPOHyperparameters(group_size=GROUP))
    args["gen"].update(max_new_tokens=6)
    args.update(changes)
    return args


def test_grpo_generate_groups_and_train(tokenizer):
    actor = train_model(tokenizer, lr=1e-3)
    grpo = INTERFACES.get("grpo_actor")(**grpo_args())
    prompts = dataset_batch("prompt", tokenizer, 4)
    torch.manual_seed(0)
    out = grpo.generate(actor, prompts, MB)
    assert out.ids == prompts.ids
    for i, [n_prompt] in enumerate(prompts.seqlens["packed_prompts"]):
        lens = out.seqlens["packed_input_ids"][i]
        assert len(lens) == GROUP and all(n > n_prompt for n in lens)
        assert out.seqlens["prompt_mask"][i] == lens
        assert out.seqlens["logprobs"][i] == [n - 1 for n in lens]
        assert out.seqlens["no_eos_mask"][i] == [1] * GROUP
    assert out.data["prompt_mask"].sum() == GROUP * prompts.total_tokens("packed_prompts")

    # The iteration's other MFCs: ref log-probs and one reward per sequence.
    data = out.select(out.keys)
    ref = inference_model(tokenizer, seed=1)
    ref_out = grpo.inference(ref, out.select(["packed_input_ids"]), MB)
    assert ref_out.seqlens["logprobs"] == out.seqlens["logprobs"]
    data.update_(ref_out.remap_keys({"logprobs": "ref_logprobs"}))
    scores = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.2], [0.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    rewards = SequenceSample.from_sequences(
        out.ids, {"rewards": [list(s[:, None]) for s in scores]}
    )
    assert rewards.seqlens["rewards"] == [[1] * GROUP] * 4
    data.update_(rewards)

    adv_T1, stats = grpo.advantages(data)
    mask = answer_mask_T1(data.data["prompt_mask"], data.cu_seqlens("packed_input_ids"))
    expected = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-6)
    per_seq = adv_T1.split(data.flat_seqlens("logprobs"))
    seq_masks = mask.split(data.flat_seqlens("logprobs"))
    for j, (a, m) in enumerate(zip(per_seq, seq_masks)):
        assert torch.all(a[~m] == 0)
        assert torch.allclose(a[m], expected.flatten()[j].expand(int(m.sum())), atol=1e-5)
    assert stats["reward/mean"] == pytest.approx(float(scores.mean()))

    before = copy_params(actor.module.module)
    train_stats = grpo.train_step(actor, data, MB)
    assert all(math.isfinite(v) for v in train_stats.values()), train_stats
    assert train_stats["reward/mean"] == pytest.approx(float(scores.mean()))
    for key in ("loss", "ref_kl", "clip_frac", "importance_ratio", "grad_norm"):
        assert key in train_stats
    assert changed(before, actor.module.module)


def test_grpo_sequence_mean_loss_runs(tokenizer):
    actor = train_model(tokenizer)
    grpo = INTERFACES.get("grpo_actor")(**grpo_args(loss_type="grpo", n_minibatches=1))
    out = grpo.generate(actor, dataset_batch("prompt", tokenizer, 2), MB)
    data = out.select(out.keys)
    data.update_(grpo.inference(actor, out, MB).remap_keys({"logprobs": "ref_logprobs"}))
    n = len(data.flat_seqlens("packed_input_ids"))
    data.update_(
        SequenceSample.from_sequences(
            data.ids, {"rewards": [list(torch.arange(GROUP, dtype=torch.float32)[:, None])] * 2}
        )
    )
    stats = grpo.train_step(actor, data, MB)
    assert n == 2 * GROUP and math.isfinite(stats["loss"])
    assert stats["ref_kl"] == pytest.approx(0.0, abs=1e-6)  # ref = the actor itself
