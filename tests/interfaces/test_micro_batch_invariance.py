"""Every train interface: one train_step over 1 micro-batch and over 3 gives the same weights.

Gradient accumulation must weight each micro-batch's loss by its share of the loss's own
aggregation (answer tokens for a token mean, sequences for a sequence mean, pairs or samples
for a pair mean); any other weighting changes the gradient when micro-batches differ in those
ratios, which the hand-built batches below make sure of (answer lengths 1..12).

AdamW's first step is about lr * sign(grad), which would hide a mis-scaled gradient; with
eps = 1 (far above these gradients) the step is proportional to the gradient, so the weights
show any change of weighting.
"""

from __future__ import annotations

import pytest
import torch
from iface_testutils import NO_LIMIT, grouped_batch, inference_model, rl_batch, train_model

from realflow.algorithms.ppo import LOSS_TYPES
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.registry import INTERFACES
from realflow.engines import OptimizerConfig

LINEAR_STEP = OptimizerConfig(
    lr=1.0, eps=1.0, gradient_clipping=0.0, lr_scheduler_type="constant",
    warmup_steps_proportion=0.0,
)  # fmt: skip
SPLITS = ("n_mbs=3", "max_tokens")


def split_spec(split: str, data: SequenceSample, n_steps: int = 1) -> MicroBatchSpec:
    """3 micro-batches per step, or a token budget that makes at least 3 per step."""
    if split == "n_mbs=3":
        return MicroBatchSpec(n_mbs=3)
    return MicroBatchSpec(max_tokens_per_mb=sum(data.sample_tokens()) // (3 * n_steps))


def record_micro_batches(model) -> list[int]:
    """How many micro-batches each optimizer step of `model` gets (appended per step)."""
    counts, engine = [], model.module
    train_batch = engine.train_batch

    def counting(mbs, *args, **kwargs):
        counts.append(len(mbs))
        return train_batch(mbs, *args, **kwargs)

    engine.train_batch = counting
    return counts


def weights_after_step(tokenizer, head, iface, data, mb_spec, n_steps=1):
    """Parameters of a fresh model (seed 0) after one train_step; also checks the split."""
    model = train_model(tokenizer, head=head, optim=LINEAR_STEP)
    before = {k: v.clone() for k, v in model.module.module.state_dict().items()}
    counts = record_micro_batches(model)
    iface.train_step(model, data, mb_spec)
    assert len(counts) == n_steps
    if mb_spec is NO_LIMIT:
        assert counts == [1] * n_steps
    else:  # minibatches are split by tokens, so a small one may hold fewer than 3 samples
        assert max(counts) >= 3, counts
    after = model.module.module.state_dict()
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-3  # the step changed the weights far beyond the tolerance
    return after


def assert_same_weights(tokenizer, head, make_iface, data, split, n_steps=1):
    one = weights_after_step(tokenizer, head, make_iface(), data, NO_LIMIT, n_steps)
    spec = split_spec(split, data, n_steps)
    three = weights_after_step(tokenizer, head, make_iface(), data, spec, n_steps)
    for k, v in one.items():
        torch.testing.assert_close(three[k], v, atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("split", SPLITS)
def test_sft(tokenizer, split):
    data = grouped_batch(tokenizer, [1] * 6)
    assert_same_weights(tokenizer, "lm", INTERFACES.get("sft"), data, split)


@pytest.mark.parametrize("split", SPLITS)
def test_paired_rw(tokenizer, split):
    data = grouped_batch(tokenizer, [2, 4, 2, 2, 6, 2], seed=1)  # some samples hold 2 or 3 pairs
    assert_same_weights(tokenizer, "reward", INTERFACES.get("paired_rw"), data, split)


@pytest.mark.parametrize("split", SPLITS)
def test_dpo(tokenizer, split):
    data = grouped_batch(tokenizer, [2, 4, 2, 2, 6, 2], seed=2)
    ref = inference_model(tokenizer, seed=1)
    make = lambda: INTERFACES.get("dpo")(beta=0.5)  # noqa: E731
    data.update_(make().inference(ref, data, NO_LIMIT).remap_keys({"seqlogp": "ref_seqlogp"}))
    assert_same_weights(tokenizer, "lm", make, data, split)


def ppo_iface(role: str, **changes):
    from realflow.experiments.common import interface_args
    from realflow.experiments.ppo import PPOHyperparameters

    args = interface_args(PPOHyperparameters())
    args.update(changes)
    return INTERFACES.get(role)(**args)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("role,head", [("ppo_actor", "lm"), ("ppo_critic", "critic")])
def test_ppo(tokenizer, role, head, split):
    """Two minibatches (two optimizer steps), each split into micro-batches."""
    data = rl_batch(tokenizer, [1] * 6, ppo_iface("ppo_actor"), seed=3)
    critic_model = inference_model(tokenizer, head="critic", seed=2)
    data.update_(ppo_iface("ppo_critic").inference(critic_model, data, NO_LIMIT))
    data.data["values"] = data.data["values"] + 0.5  # values away from the returns
    make = lambda: ppo_iface(role, ppo_n_minibatches=2)  # noqa: E731
    assert_same_weights(tokenizer, head, make, data, split, n_steps=2)


def policy_iface(exp: str, impl: str, **changes):
    from realflow.api.registry import EXPERIMENTS
    from realflow.experiments.common import interface_args

    cfg = EXPERIMENTS.get(exp)()
    args = interface_args(cfg.hyperparameters())
    args.update(n_minibatches=1, **changes)
    return INTERFACES.get(impl)(**args)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("split", SPLITS)
def test_grpo(tokenizer, loss_type, split):
    make = lambda: policy_iface("grpo", "grpo_actor", group_size=3, loss_type=loss_type)  # noqa: E731
    data = rl_batch(tokenizer, [3] * 6, make(), seed=4)
    assert_same_weights(tokenizer, "lm", make, data, split)


@pytest.mark.parametrize("kl_in_reward", [True, False])
@pytest.mark.parametrize("split", SPLITS)
def test_rloo(tokenizer, kl_in_reward, split):
    make = lambda: policy_iface("rloo", "rloo_actor", group_size=3, kl_in_reward=kl_in_reward)  # noqa: E731
    data = rl_batch(tokenizer, [3] * 6, make(), seed=5)
    assert_same_weights(tokenizer, "lm", make, data, split)


@pytest.mark.parametrize("split", SPLITS)
def test_reinforce_pp(tokenizer, split):
    """Advantages are whitened over the whole batch, before it is split."""
    make = lambda: policy_iface("reinforce_pp", "reinforce_pp_actor", loss_type="dr_grpo")  # noqa: E731
    data = rl_batch(tokenizer, [1] * 12, make(), seed=6)
    assert_same_weights(tokenizer, "lm", make, data, split)


# ---- per-token loss scales -------------------------------------------------------------------------


def with_loss_scale(data: SequenceSample, seed: int) -> SequenceSample:
    """`data` plus `loss_scale`: 0 on the prompt, weights in [0, 2) on answer tokens, a fifth of
    them 0, so the micro-batches' shares of trained tokens differ from their answer tokens'."""
    g = torch.Generator().manual_seed(seed)
    prompt_T = data.data["prompt_mask"]
    w_T = torch.rand(prompt_T.shape, generator=g) * 2
    w_T[(torch.rand(prompt_T.shape, generator=g) < 0.2) | prompt_T] = 0.0
    lens = [list(x) for x in data.seqlens["packed_input_ids"]]
    data.update_(
        SequenceSample(ids=data.ids, seqlens={"loss_scale": lens}, data={"loss_scale": w_T})
    )
    return data


@pytest.mark.parametrize("split", SPLITS)
def test_sft_with_loss_scale(tokenizer, split):
    data = with_loss_scale(grouped_batch(tokenizer, [1] * 6, seed=5), seed=5)
    assert_same_weights(tokenizer, "lm", INTERFACES.get("sft"), data, split)


@pytest.mark.parametrize("split", SPLITS)
def test_dpo_with_loss_scale(tokenizer, split):
    data = with_loss_scale(grouped_batch(tokenizer, [2, 4, 2, 2, 6, 2], seed=6), seed=6)
    ref = inference_model(tokenizer, seed=1)
    make = lambda: INTERFACES.get("dpo")(beta=0.5)  # noqa: E731
    data.update_(make().inference(ref, data, NO_LIMIT).remap_keys({"seqlogp": "ref_seqlogp"}))
    assert_same_weights(tokenizer, "lm", make, data, split)
