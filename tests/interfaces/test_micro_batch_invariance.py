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
from iface_testutils import NO_LIMIT, inference_model, train_model

from realflow.algorithms.ppo import LOSS_REDUCTIONS
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.registry import INTERFACES
from realflow.engines import OptimizerConfig
from realflow.interfaces.common import answer_mask_T1

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


def random_sequences(n: int, seed: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (ids, prompt_mask) sequences: prompts of 2..5 tokens, answers of 1..12 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_prompt = int(torch.randint(2, 6, (), generator=g))
        n_answer = int(torch.randint(1, 13, (), generator=g))
        ids = torch.randint(3, vocab, (n_prompt + n_answer,), generator=g)
        mask = torch.tensor([True] * n_prompt + [False] * n_answer)
        out.append((ids, mask))
    return out


def grouped_batch(tokenizer, group_sizes: list[int], seed: int = 0) -> SequenceSample:
    """Samples holding `group_sizes[i]` sequences each (packed_input_ids, prompt_mask)."""
    seqs = random_sequences(sum(group_sizes), seed, len(tokenizer))
    ids, masks, start = [], [], 0
    for n in group_sizes:
        ids.append([s for s, _ in seqs[start : start + n]])
        masks.append([m for _, m in seqs[start : start + n]])
        start += n
    keys = {"packed_input_ids": ids, "prompt_mask": masks}
    return SequenceSample.from_sequences(list(range(len(group_sizes))), keys)


def per_sequence(data: SequenceSample, values: list[float]) -> SequenceSample:
    """One value per sequence of packed_input_ids, under `rewards`."""
    it = iter(values)
    rows = [[torch.tensor([next(it)]) for _ in lens] for lens in data.seqlens["packed_input_ids"]]
    return SequenceSample.from_sequences(data.ids, {"rewards": rows})


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


def rl_batch(tokenizer, group_sizes, iface, seed):
    """A train batch of ppo/grpo: sequences with the actor's own log-probs (0 on the prompt, as
    a rollout stores them), a reference's log-probs, a critic's values and random rewards."""
    data = grouped_batch(tokenizer, group_sizes, seed)
    ids = data.select(["packed_input_ids"])
    logp = iface.inference(inference_model(tokenizer, seed=0), ids, NO_LIMIT)
    mask_T1 = answer_mask_T1(data.data["prompt_mask"], data.cu_seqlens("packed_input_ids"))
    logp.data["logprobs"] = logp.data["logprobs"] * mask_T1
    data.update_(logp)
    ref = iface.inference(inference_model(tokenizer, seed=1), ids, NO_LIMIT)
    data.update_(ref.remap_keys({"logprobs": "ref_logprobs"}))
    n = sum(group_sizes)
    g = torch.Generator().manual_seed(seed)
    data.update_(per_sequence(data, torch.randn(n, generator=g).tolist()))
    no_eos = [[torch.tensor([bool(b)]) for b in (torch.rand(len(lens), generator=g) < 0.3)]
              for lens in data.seqlens["packed_input_ids"]]  # fmt: skip
    data.update_(SequenceSample.from_sequences(data.ids, {"no_eos_mask": no_eos}))
    return data


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


@pytest.mark.parametrize("loss_agg", sorted(LOSS_REDUCTIONS))
@pytest.mark.parametrize("split", SPLITS)
def test_grpo(tokenizer, loss_agg, split):
    from realflow.experiments.common import interface_args
    from realflow.experiments.grpo import GRPOHyperparameters

    def make():
        args = interface_args(GRPOHyperparameters(group_size=3))
        args.update(loss_agg=loss_agg, n_minibatches=1)
        return INTERFACES.get("grpo_actor")(**args)

    data = rl_batch(tokenizer, [3] * 6, make(), seed=4)
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
