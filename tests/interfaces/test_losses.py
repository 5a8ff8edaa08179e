"""Losses taken by name (SFT_LOSSES, DPO_LOSSES, RW_LOSSES) and per-token loss scales, against
plain loops over each sequence's positions on the model's own unpacked outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from iface_testutils import MB, NO_LIMIT, dataset_batch, inference_model, train_model

from realflow.api.data import SequenceSample
from realflow.api.registry import DPO_LOSSES, INTERFACES, RW_LOSSES, SFT_LOSSES
from realflow.interfaces.losses import TokenLossInput, call_loss


@pytest.fixture
def registered():
    """Register test losses; unregistered afterwards."""
    names = []

    def register(registry, name, fn):
        registry.register(name, fn)
        names.append((registry, name))
        return name

    yield register
    for registry, name in names:
        registry.unregister(name)


def scaled(data: SequenceSample, seed: int = 0) -> SequenceSample:
    """`data` plus a loss_scale: 0 on the prompt, random weights on answer tokens (some 0)."""
    g = torch.Generator().manual_seed(seed)
    prompt_T = data.data["prompt_mask"]
    w_T = torch.rand(prompt_T.shape, generator=g) * 3
    w_T[(torch.rand(prompt_T.shape, generator=g) < 0.25) | prompt_T] = 0.0
    lens = [list(x) for x in data.seqlens["packed_input_ids"]]
    data.update_(
        SequenceSample(ids=data.ids, seqlens={"loss_scale": lens}, data={"loss_scale": w_T})
    )
    return data


def per_position(module, data):
    """Per sequence, per predicted position t >= 1: (log p(token t), logits row t-1, scale of t)
    from a plain unpacked forward; the scale is loss_scale, or 1 on answer tokens."""
    ids_all = data.data["packed_input_ids"]
    scale_all = data.data.get("loss_scale", (~data.data["prompt_mask"]).float())
    cu = data.cu_seqlens("packed_input_ids").tolist()
    out = []
    with torch.no_grad():
        for a, b in zip(cu[:-1], cu[1:]):
            ids = ids_all[a:b]
            logits = module(ids, torch.tensor([0, b - a], dtype=torch.int32)).float()
            lp = F.log_softmax(logits, -1)
            out.append(
                [
                    (lp[t - 1, ids[t]], logits[t - 1], float(scale_all[a + t]))
                    for t in range(1, b - a)
                ]
            )
    return out


def test_sft_loss_scale_weighs_each_token(tokenizer):
    model = train_model(tokenizer)
    data = scaled(dataset_batch("sft", tokenizer, 6))
    positions = [p for seq in per_position(model.module.module, data) for p in seq]
    trained = [(lp, s) for lp, _, s in positions if s > 0]
    stats = INTERFACES.get("sft")().train_step(model, data, MB)
    assert stats["n_tokens"] == len(trained)
    assert stats["loss"] == pytest.approx(
        sum(-s * float(lp) for lp, s in trained) / len(trained), rel=1e-5
    )
    assert stats["nll"] == pytest.approx(
        sum(-float(lp) for lp, _ in trained) / len(trained), rel=1e-5
    )


def test_sft_loss_of_your_own(tokenizer, registered):
    def focal(inp):
        p = inp.logprobs_T1.exp()
        return -((1 - p) ** 2) * inp.logprobs_T1, {"mean_p": float(p.detach().mean())}

    def z_loss(inp):  # reads the logits of the rows that predict a token
        return inp.shifted_logits().float().logsumexp(-1) ** 2

    data = scaled(dataset_batch("sft", tokenizer, 5), seed=1)
    module = train_model(tokenizer).module.module
    positions = [p for seq in per_position(module, data) for p in seq if p[2] > 0]
    want = {
        "focal": sum(-s * (1 - lp.exp()) ** 2 * lp for lp, _, s in positions) / len(positions),
        "z_loss": sum(s * row.logsumexp(-1) ** 2 for _, row, s in positions) / len(positions),
    }
    for fn in (focal, z_loss):
        name = registered(SFT_LOSSES, f"test_{fn.__name__}", fn)
        stats = INTERFACES.get("sft")(loss=name).train_step(train_model(tokenizer), data, MB)
        assert stats["loss"] == pytest.approx(float(want[fn.__name__]), rel=1e-5), fn.__name__
    assert "mean_p" in INTERFACES.get("sft")(loss="test_focal").train_step(
        train_model(tokenizer), data, MB
    )


def test_a_loss_that_returns_the_wrong_shape_is_an_error(tokenizer, registered):
    name = registered(SFT_LOSSES, "test_mean", lambda inp: -inp.logprobs_T1.mean())
    with pytest.raises(ValueError, match="must return one value per unit"):
        INTERFACES.get("sft")(loss=name).train_step(
            train_model(tokenizer), dataset_batch("sft", tokenizer, 2), MB
        )
    with pytest.raises(ValueError, match="unknown sft loss 'nl'.*Did you mean 'nll'"):
        INTERFACES.get("sft")(loss="nl")


def seq_logps(module, data):
    """Sum of scale * log p over each sequence (plain loop) and the trained-token counts."""
    per_seq = per_position(module, data)
    logp = torch.stack([sum(s * lp for lp, _, s in seq) for seq in per_seq])
    return logp, torch.tensor([float(sum(s > 0 for _, _, s in seq)) for seq in per_seq])


def test_dpo_loss_scale_and_a_loss_of_your_own(tokenizer, registered):
    def hinge(inp):
        n = inp.chosen_tokens_P + inp.rejected_tokens_P
        return F.relu(1 - inp.beta * inp.logits_P()), {"tokens": float(n.mean())}

    name = registered(DPO_LOSSES, "test_hinge", hinge)
    dpo = INTERFACES.get("dpo")(beta=0.3, loss=name)
    data = scaled(dataset_batch("paired", tokenizer, 6), seed=2)
    ref = inference_model(tokenizer, seed=1)
    ref_out = dpo.inference(ref, data, MB)
    ref_logp, _ = seq_logps(ref.module.module, data)
    torch.testing.assert_close(ref_out.data["seqlogp"], ref_logp, atol=1e-4, rtol=1e-5)
    data.update_(ref_out.remap_keys({"seqlogp": "ref_seqlogp"}))
    actor = train_model(tokenizer)
    pi, n = seq_logps(actor.module.module, data)
    stats = dpo.train_step(actor, data, MB)
    logits = (pi[0::2] - pi[1::2]) - (ref_logp[0::2] - ref_logp[1::2])
    assert stats["loss"] == pytest.approx(float(F.relu(1 - 0.3 * logits).mean()), rel=1e-4)
    assert stats["tokens"] == pytest.approx(float((n[0::2] + n[1::2]).mean()))


def test_rw_loss_of_your_own(tokenizer, registered):
    name = registered(
        RW_LOSSES, "test_margin", lambda inp: F.relu(1 - (inp.chosen_P - inp.rejected_P))
    )
    model = train_model(tokenizer, head="reward", name="rew")
    one = dataset_batch("paired", tokenizer, 4).unpack()
    # samples of 1, 2 and 1 pairs: the loss is a mean over samples of their mean over pairs
    data = SequenceSample.gather([_merge(one[:1]), _merge(one[1:3]), _merge(one[3:])])
    rw = INTERFACES.get("paired_rw")(loss=name)
    scores = rw.inference(model, data, NO_LIMIT).data["rewards"]
    per_pair = F.relu(1 - (scores[0::2] - scores[1::2])).tolist()
    want = (per_pair[0] + (per_pair[1] + per_pair[2]) / 2 + per_pair[3]) / 3
    assert rw.train_step(model, data, MB)["loss"] == pytest.approx(want, rel=1e-5)


def _merge(samples: list[SequenceSample]) -> SequenceSample:
    """One sample holding the sequences of several (their pairs, in order)."""
    keys = ("packed_input_ids", "prompt_mask")
    seqs = {k: [[t for s in samples for t in s.data[k].split(s.flat_seqlens(k))]] for k in keys}
    return SequenceSample.from_sequences(samples[0].ids, seqs)


def test_call_loss_names_what_a_loss_returned_instead_of_a_tensor():
    with pytest.raises(
        ValueError, match=r"^loss 'mine' must return one value per unit, shape \(2,\); got list$"
    ):
        call_loss(lambda inp: [1.0, 2.0], None, 2, "mine")
    with pytest.raises(ValueError, match=r"shape \(2,\); got \(3,\)$"):
        call_loss(lambda inp: torch.zeros(3), None, 2, "mine")


def test_token_loss_input_rows_and_targets_against_a_loop_over_sequences():
    # sequences of 3, 1 and 4 tokens: row t of a sequence predicts its token t+1
    ids_T = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
    cu_B1 = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    logits_TV = torch.arange(8 * 2, dtype=torch.float32).reshape(8, 2)
    inp = TokenLossInput(logits_TV, torch.zeros(4), torch.ones(4), ids_T, cu_B1)
    bounds = [(0, 3), (3, 4), (4, 8)]
    want_targets = [int(ids_T[t]) for a, b in bounds for t in range(a + 1, b)]
    want_rows = [logits_TV[t] for a, b in bounds for t in range(a, b - 1)]
    assert inp.target_ids_T1().tolist() == want_targets == [6, 7, 10, 11, 12]
    torch.testing.assert_close(inp.shifted_logits(), torch.stack(want_rows))
