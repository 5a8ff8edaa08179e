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
    packed_entropy,
    segment_sum,
    seqlens_from_cu,
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


# ---- found by mutation testing (benchmarks/RESULTS.md, "Third session") ----


def test_cu_seqlens_from_lens_refuses_2d_or_negative_lengths():
    with pytest.raises(ValueError, match=r"seqlens_B must be 1-D, got shape \(1, 2\)"):
        cu_seqlens_from_lens([[3, 4]])
    with pytest.raises(ValueError, match="sequence lengths must be >= 0, got min -2"):
        cu_seqlens_from_lens([3, -2, 1])


def test_seqlens_from_cu_of_an_empty_batch_and_bad_shapes():
    assert seqlens_from_cu(torch.tensor([0])).tolist() == []  # B = 0: one entry
    assert seqlens_from_cu(torch.tensor([0, 3, 4], dtype=torch.int32)).tolist() == [3, 1]
    empty, two_d = torch.tensor([], dtype=torch.int64), torch.tensor([[0, 3]])
    for bad, shape in ((empty, r"\(0,\)"), (two_d, r"\(1, 2\)")):
        msg = rf"cu_seqlens_B1 must be 1-D with >= 1 entry, got {shape}"
        with pytest.raises(ValueError, match=msg):
            seqlens_from_cu(bad)


def test_segment_sum_of_rows_and_its_length_check():
    """x may have trailing dims: each segment sums whole rows (a loop over rows here)."""
    x = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    lens = [2, 1, 3]
    want, s = [], 0
    for n in lens:
        want.append([sum(float(x[s + t, j]) for t in range(n)) for j in range(2)])
        s += n
    got = segment_sum(x, cu_seqlens_from_lens(lens))
    assert got.tolist() == want
    with pytest.raises(ValueError, match="x has 5 entries but cu_seqlens_B1 covers 6"):
        segment_sum(x[:5], cu_seqlens_from_lens(lens))


def test_build_answer_mask_allows_a_prompt_only_sequence():
    """P == L is allowed (1 <= P <= L): that sequence has no answer position."""
    mask = build_answer_mask([3, 2], [3, 4])
    assert mask.tolist() == [False, False] + [False, True, True]


def test_build_answer_mask_names_the_first_bad_sequence():
    msg = r"need 1 <= prompt_len <= seqlen, got 5 and 4 at sequence 1"
    with pytest.raises(ValueError, match=msg):
        build_answer_mask([2, 5, 0], [3, 4, 2])


def test_packed_entropy_defaults_to_temperature_one():
    lens = [3, 4]
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want, s = [], 0
    for n in lens:
        for t in range(n - 1):
            row = logits[s + t].tolist()
            z = sum(math.exp(v) for v in row)
            want.append(-sum(math.exp(v) / z * (v - math.log(z)) for v in row))
        s += n
    got = packed_entropy(logits, cu_seqlens_from_lens(lens))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_masks_of_another_dtype_keep_the_dtype_of_the_data():
    """Masks are cast to the data's dtype (module docstring): a float64 mask does not turn
    float32 results into float64."""
    pk = Packed([3, 4], [1, 2])
    mask64 = pk.mask().double()
    lp = randn(pk.t1, 5, dtype=torch.float32)
    got = sequence_logprobs(lp, mask64, pk.cu)
    assert got.dtype == torch.float32
    want = [sum(v * m for v, m in zip(seq, ms)) for seq, ms in zip(pk.split_t1(lp), pk.mask_list())]
    torch.testing.assert_close(got, torch.tensor(want))

    vals = torch.tensor([2.0, -1.0])
    got_b = broadcast_to_tokens(vals, mask64, pk.cu)
    assert got_b.dtype == torch.float32
    assert got_b.tolist() == [2.0, 2.0, 0.0, -1.0, -1.0]

    values = torch.arange(7, dtype=torch.float32)
    _, boot = split_critic_values(values, pk.cu, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert boot.dtype == torch.float32
    assert boot.tolist() == [0.0, 6.0]


# lens 3, 2, 4: cu_seqlens_B1 = [0, 3, 5, 9], shifted [0, 2, 3, 6]; the messages must give the
# totals (cu[-1]), not another entry
CU3 = cu_seqlens_from_lens([3, 2, 4])


def test_last_token_values_and_split_critic_values_messages():
    with pytest.raises(ValueError, match="values_T has 8 entries, cu_seqlens_B1 covers 9"):
        last_token_values(torch.zeros(8), CU3)
    msg = r"no_eos_mask_B shape \(2,\) != batch size 3"
    with pytest.raises(ValueError, match=msg):
        split_critic_values(torch.zeros(9), CU3, torch.zeros(2, dtype=torch.bool))


@pytest.mark.parametrize("n_values, n_mask", [(2, 6), (3, 5)])
def test_broadcast_to_tokens_checks_values_and_mask_separately(n_values, n_mask):
    msg = (
        rf"values_B has {n_values} entries, loss_mask_T1 {n_mask}; "
        r"cu_seqlens_B1 describes 3 sequences and 6 T1 positions"
    )
    with pytest.raises(ValueError, match=msg):
        broadcast_to_tokens(torch.zeros(n_values), torch.ones(n_mask), CU3)
