import math

import pytest
import torch
from alg_testutils import Packed, packed_batches, randn
from hypothesis import given, settings

from realflow.algorithms import (
    broadcast_to_tokens,
    build_answer_mask,
    cu_seqlens_from_lens,
    gather_packed_logprobs,
    last_token_values,
    sequence_logprobs,
    shifted_cu_seqlens,
    split_critic_values,
)


def ref_logprobs(
    logits: list[list[float]], ids: list[int], lens: list[int], temp: float
) -> list[float]:
    out, s = [], 0
    for n in lens:
        for t in range(n - 1):
            row = [v / temp for v in logits[s + t]]
            m = max(row)
            lse = m + math.log(sum(math.exp(v - m) for v in row))
            out.append(row[ids[s + t + 1]] - lse)
        s += n
    return out


def test_cu_seqlens_and_shift():
    cu = cu_seqlens_from_lens([3, 1, 4])
    assert cu.tolist() == [0, 3, 4, 8]
    assert shifted_cu_seqlens(cu).tolist() == [0, 2, 2, 5]
    with pytest.raises(ValueError, match=">= 1 token"):
        shifted_cu_seqlens(cu_seqlens_from_lens([3, 0]))


@given(packed_batches())
@settings(max_examples=30, deadline=None)
def test_build_answer_mask_matches_hand_layout(pk: Packed):
    mask = build_answer_mask(pk.prompts, pk.lens)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [bool(v) for m in pk.mask_list() for v in m]


def test_build_answer_mask_rejects_bad_prompt():
    with pytest.raises(ValueError, match="1 <= prompt_len <= seqlen"):
        build_answer_mask([0], [3])
    with pytest.raises(ValueError, match="1 <= prompt_len <= seqlen"):
        build_answer_mask([4], [3])
    shapes = r"prompt_lens_B \(2,\) and seqlens_B \(1,\) must be 1-D and equal"
    with pytest.raises(ValueError, match=shapes):
        build_answer_mask([1, 2], [3])
    with pytest.raises(ValueError, match="must be 1-D"):
        build_answer_mask([[1, 2]], [[3, 3]])


@given(packed_batches(max_b=4, max_len=7))
@settings(max_examples=25, deadline=None)
def test_gather_packed_logprobs_matches_loop(pk: Packed):
    T, V = sum(pk.lens), 11
    g = torch.Generator().manual_seed(T)
    logits = torch.randn(T, V, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, V, (T,), generator=g)
    for temp, chunk in ((1.0, 2048), (0.7, 3)):
        got = gather_packed_logprobs(logits, ids, pk.cu, temperature=temp, chunk_size=chunk)
        want = ref_logprobs(logits.tolist(), ids.tolist(), pk.lens, temp)
        assert got.shape == (pk.t1,)
        torch.testing.assert_close(
            got, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-5
        )


def test_gather_packed_logprobs_never_crosses_boundary_and_grads():
    lens = [3, 2, 4]
    T, V = sum(lens), 5
    logits = torch.randn(T, V, dtype=torch.float32, requires_grad=True)
    ids = torch.randint(0, V, (T,))
    cu = cu_seqlens_from_lens(lens)
    got = gather_packed_logprobs(logits, ids, cu, chunk_size=2)
    got.sum().backward()
    grad = logits.grad.clone()
    # Last row of every sequence never predicts anything.
    for end in cu[1:].tolist():
        assert torch.all(grad[end - 1] == 0)
    logits.grad = None
    ref = []
    s = 0
    for n in lens:
        for t in range(n - 1):
            ref.append(torch.log_softmax(logits[s + t], -1)[ids[s + t + 1]])
        s += n
    torch.stack(ref).sum().backward()
    torch.testing.assert_close(grad, logits.grad)


@given(packed_batches())
@settings(max_examples=30, deadline=None)
def test_sequence_logprobs_and_broadcast(pk: Packed):
    lp = randn(pk.t1, len(pk.lens))
    got = sequence_logprobs(lp, pk.mask(), pk.cu)
    want = [sum(v * m for v, m in zip(seq, ms)) for seq, ms in zip(pk.split_t1(lp), pk.mask_list())]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))

    vals = randn(len(pk.lens), 7)
    got_b = broadcast_to_tokens(vals, pk.mask(), pk.cu)
    want_b = [float(vals[i]) * m for i, ms in enumerate(pk.mask_list()) for m in ms]
    torch.testing.assert_close(got_b, torch.tensor(want_b, dtype=torch.float64))


def test_sequence_logprobs_grad():
    pk = Packed([4, 3], [2, 1])
    lp = randn(pk.t1, 0).requires_grad_()
    sequence_logprobs(lp, pk.mask(), pk.cu).sum().backward()
    assert lp.grad.tolist() == [float(v) for v in pk.mask().tolist()]


def test_split_critic_values_and_last_token():
    lens = [3, 2, 4]
    cu = cu_seqlens_from_lens(lens)
    values = torch.arange(9, dtype=torch.float32)  # seq0: 0 1 2 | seq1: 3 4 | seq2: 5 6 7 8
    assert last_token_values(values, cu).tolist() == [2.0, 4.0, 8.0]
    v_t1, boot = split_critic_values(values, cu, torch.tensor([False, True, True]))
    assert v_t1.tolist() == [0.0, 1.0, 3.0, 5.0, 6.0, 7.0]
    assert boot.tolist() == [0.0, 4.0, 8.0]


def test_gather_packed_logprobs_bf16_logits_give_float32():
    lens = [4, 3]
    logits = torch.randn(7, 13).to(torch.bfloat16)
    ids = torch.randint(0, 13, (7,))
    got = gather_packed_logprobs(logits, ids, cu_seqlens_from_lens(lens))
    assert got.dtype == torch.float32
    want = ref_logprobs(logits.float().tolist(), ids.tolist(), lens, 1.0)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
