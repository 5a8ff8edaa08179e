"""sft, paired_rw and dpo against direct computations on the model's own outputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from iface_testutils import (
    MB,
    NO_LIMIT,
    changed,
    copy_params,
    dataset_batch,
    inference_model,
    train_model,
)

from realflow.algorithms import dpo_loss
from realflow.api.registry import INTERFACES


def logits_per_seq(module, data):
    """Per sequence, (ids, prompt_mask, logits) from a plain unpacked forward."""
    out = []
    ids_all, mask_all = data.data["packed_input_ids"], data.data["prompt_mask"]
    cu = data.cu_seqlens("packed_input_ids").tolist()
    with torch.no_grad():
        for a, b in zip(cu[:-1], cu[1:]):
            ids = ids_all[a:b]
            logits = module(ids, torch.tensor([0, b - a], dtype=torch.int32))
            out.append((ids, mask_all[a:b], logits))
    return out


def answer_logps(ids, mask, logits):
    """Log-probs of the answer tokens of one sequence (a plain loop over positions)."""
    lp = F.log_softmax(logits.float(), -1)
    return torch.stack([lp[t - 1, ids[t]] for t in range(1, len(ids)) if not mask[t]])


def test_sft_loss_is_answer_token_nll_and_decreases(tokenizer):
    model = train_model(tokenizer, lr=3e-3)
    data = dataset_batch("sft", tokenizer, 6)
    per_seq = logits_per_seq(model.module.module, data)
    nll = torch.cat([-answer_logps(*x) for x in per_seq])
    sft = INTERFACES.get("sft")()
    stats = sft.train_step(model, data, MB)
    assert stats["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert stats["n_tokens"] == nll.numel()
    assert stats["ppl"] == pytest.approx(math.exp(stats["loss"]), rel=1e-6)
    losses = [sft.train_step(model, data, MB)["loss"] for _ in range(5)]
    assert losses[-1] < stats["loss"]


def test_sft_inference_logprobs(tokenizer):
    model = inference_model(tokenizer)
    data = dataset_batch("sft", tokenizer, 4)
    out = INTERFACES.get("sft")().inference(model, data, MB)
    assert out.seqlens["logprobs"] == [[n - 1] for [n] in data.seqlens["packed_input_ids"]]
    first = logits_per_seq(model.module.module, data)[0]
    ids, _, logits = first
    ref = F.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]]
    assert torch.allclose(out.data["logprobs"][: len(ids) - 1], ref, atol=1e-5)


def test_paired_rw_matches_direct_computation(tokenizer):
    model = train_model(tokenizer, head="reward", name="rew")
    data = dataset_batch("paired", tokenizer, 6)
    assert data.seqlens["packed_input_ids"][0].__len__() == 2
    rw = INTERFACES.get("paired_rw")()
    rewards = rw.inference(model, data, NO_LIMIT)
    assert rewards.seqlens["rewards"] == [[1, 1]] * 6
    module = model.module.module
    direct = []
    with torch.no_grad():
        for seq in data.data["packed_input_ids"].split(data.flat_seqlens("packed_input_ids")):
            direct.append(float(module(seq, torch.tensor([0, len(seq)], dtype=torch.int32))[0]))
    direct = torch.tensor(direct)
    assert torch.allclose(rewards.data["rewards"], direct, atol=1e-5)
    chosen, rejected = direct[0::2], direct[1::2]
    stats = rw.train_step(model, data, MB)
    assert stats["loss"] == pytest.approx(float(-F.logsigmoid(chosen - rejected).mean()), rel=1e-5)
    assert stats["acc"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert stats["pos_score"] == pytest.approx(float(chosen.mean()), abs=1e-5)
    assert stats["neg_score"] == pytest.approx(float(rejected.mean()), abs=1e-5)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_stats_match_formula(tokenizer, loss_type, smoothing):
    args = dict(beta=0.2, loss_type=loss_type, label_smoothing=smoothing)
    dpo = INTERFACES.get("dpo")(beta=0.2, loss=loss_type, label_smoothing=smoothing)
    ref = inference_model(tokenizer, seed=1)
    actor = train_model(tokenizer, seed=0)
    data = dataset_batch("paired", tokenizer, 6)
    ref_out = dpo.inference(ref, data, MB)
    assert ref_out.seqlens["seqlogp"] == [[1, 1]] * 6
    ref_direct = torch.stack(
        [answer_logps(*x).sum() for x in logits_per_seq(ref.module.module, data)]
    )
    assert torch.allclose(ref_out.data["seqlogp"], ref_direct, atol=1e-4)
    data.update_(ref_out.remap_keys({"seqlogp": "ref_seqlogp"}))
    pi = torch.stack([answer_logps(*x).sum() for x in logits_per_seq(actor.module.module, data)])
    before = copy_params(actor.module.module)
    stats = dpo.train_step(actor, data, MB)
    loss, s = dpo_loss(pi[0::2], pi[1::2], ref_direct[0::2], ref_direct[1::2], **args)
    assert stats["loss"] == pytest.approx(float(loss), rel=1e-4)
    assert stats["reward_acc"] == pytest.approx(float(s.reward_accuracy))
    assert stats["margin"] == pytest.approx(float(s.margin), abs=1e-4)
    assert stats["chosen_reward"] == pytest.approx(float(s.chosen_reward), abs=1e-4)
    assert stats["rejected_reward"] == pytest.approx(float(s.rejected_reward), abs=1e-4)
    assert changed(before, actor.module.module)


def test_unknown_dpo_loss_is_an_error():
    with pytest.raises(ValueError, match="unknown dpo loss 'sigmod'.*Did you mean 'sigmoid'"):
        INTERFACES.get("dpo")(loss="sigmod")


def test_sft_loss_does_not_depend_on_micro_batching(tokenizer):
    data = dataset_batch("sft", tokenizer, 6)
    sft = INTERFACES.get("sft")()
    a = sft.train_step(train_model(tokenizer), data, MB)
    b = sft.train_step(train_model(tokenizer), data, NO_LIMIT)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["n_tokens"] == b["n_tokens"]


def test_save_writes_a_loadable_hf_dir(tokenizer, tmp_path):
    from realflow.models.hf_io import load_hf

    model = train_model(tokenizer)
    INTERFACES.get("sft")().save(model, str(tmp_path / "actor"))
    loaded, tok = load_hf(str(tmp_path / "actor"), head="lm")
    assert tok is not None and len(tok) == len(tokenizer)
    ids = torch.tensor([1, 40, 50, 60])
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, cu), model.module.module(ids, cu))
