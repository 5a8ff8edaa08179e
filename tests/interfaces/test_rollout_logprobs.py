"""Rollout log-probs are exact without a second forward pass: whatever top-k / top-p /
min_new_tokens / stop tokens did to the sampling distribution, the stored log-probs equal a
fresh forward pass over the finished sequences (fp32, within 1e-6), and generation recorded them
in its decode steps (no `forward` call during the rollout)."""

from __future__ import annotations

import pytest
import torch
from iface_testutils import MB, dataset_batch, make_module, train_model

from realflow.algorithms import gather_packed_logprobs
from realflow.api.registry import INTERFACES
from realflow.interfaces.common import answer_mask_T1
from realflow.models.generation import GenerationConfig, generate
from realflow.models.transformer import PackedTransformer

# Frequent stop tokens (ids 4..39 of the 195-token built-in vocabulary), so that answers end at
# different lengths and min_new_tokens masks a large share of the probability mass.
STOPS = list(range(4, 40))
GENS = {
    "plain": dict(max_new_tokens=8),
    "temperature": dict(max_new_tokens=8, temperature=0.7),
    "greedy": dict(max_new_tokens=8, greedy=True, temperature=0.7, top_k=3),
    "topk-topp": dict(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9),
    "min-max-stop": dict(max_new_tokens=10, min_new_tokens=3, stop_token_ids=STOPS),
    "all": dict(
        max_new_tokens=12,
        min_new_tokens=2,
        top_k=30,
        top_p=0.85,
        temperature=1.2,
        stop_token_ids=STOPS,
    ),  # fmt: skip
}
FILTERED = {"topk-topp", "min-max-stop", "all"}
GROUP = 3
IDS = "packed_input_ids"


def _recompute(module, ids_T, cu_B1, temperature):
    with torch.no_grad():
        return gather_packed_logprobs(module(ids_T, cu_B1), ids_T, cu_B1, temperature)


@pytest.mark.parametrize("name", list(GENS))
def test_rollout_logprobs_equal_a_recompute_without_a_second_pass(tokenizer, monkeypatch, name):
    from realflow.experiments.common import interface_args
    from realflow.experiments.grpo import GRPOHyperparameters

    args = interface_args(GRPOHyperparameters(group_size=GROUP))
    args["gen"] = dict(GENS[name])
    iface = INTERFACES.get("grpo_actor")(**args)
    actor = train_model(tokenizer)
    prompts = dataset_batch("prompt", tokenizer, 4)
    forwards = []
    original = PackedTransformer.forward

    def counting_forward(self, *a, **k):
        forwards.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(PackedTransformer, "forward", counting_forward)
    out = iface.generate(actor, prompts, MB)
    assert forwards == [], "the rollout ran a forward pass besides generation"
    monkeypatch.setattr(PackedTransformer, "forward", original)

    ids, cu = out.data["packed_input_ids"], out.cu_seqlens("packed_input_ids")
    amask = answer_mask_T1(out.data["prompt_mask"], cu)
    want = _recompute(actor.module.module, ids, cu, iface.temperature)
    got = out.data["logprobs"]
    assert torch.all(got[~amask] == 0)
    torch.testing.assert_close(got[amask], want[amask], atol=1e-6, rtol=0)
    gen = GENS[name]
    n_answer = [int(n.sum()) for n in (~out.data["prompt_mask"]).split(out.flat_seqlens(IDS))]
    assert min(n_answer) >= max(1, gen.get("min_new_tokens", 0))
    assert max(n_answer) <= gen["max_new_tokens"]
    if "stop_token_ids" in gen:  # some answers ended early, at a stop token
        assert min(n_answer) < gen["max_new_tokens"]


@pytest.mark.parametrize("name", sorted(FILTERED))
def test_generation_keeps_both_the_sampled_and_the_plain_logprobs(tokenizer, name):
    """plain_logprobs_T equals the recompute; logprobs_T (the filtered distribution the tokens
    were drawn from) does not, by far more than the tolerance, so the check above can fail."""
    module = make_module(tokenizer).eval()
    prompts = dataset_batch("prompt", tokenizer, 6)
    ids, cu = prompts.data["packed_prompts"], prompts.cu_seqlens("packed_prompts")
    gconfig = GenerationConfig(eos_token_ids=[tokenizer.eos_token_id], **GENS[name])
    out = generate(module, ids, cu, gconfig, torch.Generator().manual_seed(0))
    full, full_cu, prompt_mask = out.with_prompts(ids, cu)
    want = _recompute(module, full, full_cu, gconfig.temperature)[
        answer_mask_T1(prompt_mask, full_cu)
    ]
    torch.testing.assert_close(out.plain_logprobs_T, want, atol=1e-6, rtol=0)
    assert (out.logprobs_T - want).abs().max() > 1e-3


def test_answers_of_one_prompt_share_its_prefill(tokenizer):
    """generate(prompts, n_per_prompt=3) equals generate(each prompt repeated 3 times): same
    tokens under the same seed, log-probs within fp32 rounding."""
    module = make_module(tokenizer).eval()
    prompts = dataset_batch("prompt", tokenizer, 5)
    ids, cu = prompts.data["packed_prompts"], prompts.cu_seqlens("packed_prompts")
    rows = [p for p in ids.split(prompts.flat_seqlens("packed_prompts")) for _ in range(GROUP)]
    rep_cu = torch.tensor([0, *torch.tensor([len(r) for r in rows]).cumsum(0)], dtype=torch.int32)
    gconfig = GenerationConfig(**GENS["all"], eos_token_ids=[tokenizer.eos_token_id])
    shared = generate(module, ids, cu, gconfig, torch.Generator().manual_seed(5), GROUP)
    each = generate(module, torch.cat(rows), rep_cu, gconfig, torch.Generator().manual_seed(5))
    assert torch.equal(shared.output_lens_B, each.output_lens_B)
    assert torch.equal(shared.output_ids_T, each.output_ids_T)
    assert len(set(shared.output_lens_B.tolist())) > 1  # rows stopped at different steps
    torch.testing.assert_close(shared.plain_logprobs_T, each.plain_logprobs_T, atol=1e-6, rtol=0)
    full, full_cu, _ = shared.with_prompts(ids, cu)
    torch.testing.assert_close(full_cu, each.with_prompts(torch.cat(rows), rep_cu)[1])
