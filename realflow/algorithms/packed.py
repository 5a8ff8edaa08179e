"""Helpers for packed (padding-free) batches of token sequences.

Layout conventions used across ``realflow.algorithms``:

* A batch of B sequences of lengths ``L_i`` is stored as 1-D tensors concatenated along the token
  axis (``T = sum(L_i)``) and described by ``cu_seqlens_B1`` (B+1 cumulative lengths, int32 or
  int64, ``cu_seqlens_B1[0] == 0``).
* Per-token log-probs live in the *shifted* space ``T1 = sum(L_i - 1) = T - B``: entry ``t`` of a
  sequence is ``log p(token[t + 1] | tokens[<= t])``. Sequence i occupies
  ``[cu_seqlens_B1[i] - i, cu_seqlens_B1[i + 1] - i - 1)`` of a ``*_T1`` tensor
  (see :func:`shifted_cu_seqlens`).
* ``loss_mask_T1`` is 1 (or True) on positions that predict an answer token, 0 on prompt positions.
  Masks may be bool, int or float; they are cast to the data dtype where they are used.
* Critic values: the critic emits one value per token (``values_T``, L per sequence). The first
  L-1 are ``V(s_t)`` for the action at T1-position t; the last is the value of the state after the
  final token, used to bootstrap truncated sequences (see :func:`split_critic_values`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from realflow.algorithms.chunked import rows_entropy, rows_logprobs


def cu_seqlens_from_lens(
    seqlens_B: Sequence[int] | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """Cumulative lengths ``cu_seqlens_B1`` (int64, B+1 entries, starting at 0) from lengths."""
    lens = torch.as_tensor(seqlens_B, dtype=torch.int64, device=device)
    if lens.dim() != 1:
        raise ValueError(f"seqlens_B must be 1-D, got shape {tuple(lens.shape)}")
    if lens.numel() and int(lens.min()) < 0:
        raise ValueError(f"sequence lengths must be >= 0, got min {int(lens.min())}")
    return torch.nn.functional.pad(torch.cumsum(lens, 0), (1, 0))


def seqlens_from_cu(cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
    """Lengths ``seqlens_B`` (int64) from cumulative lengths ``cu_seqlens_B1``."""
    if cu_seqlens_B1.dim() != 1 or cu_seqlens_B1.numel() < 1:
        raise ValueError(
            f"cu_seqlens_B1 must be 1-D with >= 1 entry, got {tuple(cu_seqlens_B1.shape)}"
        )
    return (cu_seqlens_B1[1:] - cu_seqlens_B1[:-1]).long()


def shifted_cu_seqlens(cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
    """Offsets of each sequence in the shifted T1 space: ``cu_seqlens_B1 - arange(B + 1)``.

    Requires every sequence to have at least one token.
    """
    lens = seqlens_from_cu(cu_seqlens_B1)
    if lens.numel() and int(lens.min()) < 1:
        raise ValueError(f"every sequence needs >= 1 token, got min length {int(lens.min())}")
    ar = torch.arange(cu_seqlens_B1.numel(), device=cu_seqlens_B1.device)
    return cu_seqlens_B1.long() - ar


def segment_ids(cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
    """Sequence index (int64) of every packed position: shape ``[cu_seqlens_B1[-1]]``.

    Pass :func:`shifted_cu_seqlens` to get the ids of a ``*_T1`` tensor.
    """
    lens = seqlens_from_cu(cu_seqlens_B1)
    ids = torch.arange(lens.numel(), device=cu_seqlens_B1.device)
    return torch.repeat_interleave(ids, lens)


def segment_sum(x_T: torch.Tensor, cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
    """Sum of ``x_T`` within each segment of ``cu_seqlens_B1``: shape ``[B]``. Differentiable."""
    n = int(cu_seqlens_B1[-1])
    if x_T.shape[0] != n:
        raise ValueError(f"x has {x_T.shape[0]} entries but cu_seqlens_B1 covers {n}")
    ids = segment_ids(cu_seqlens_B1)
    out = x_T.new_zeros((cu_seqlens_B1.numel() - 1, *x_T.shape[1:]))
    return out.index_add(0, ids, x_T)


def build_answer_mask(
    prompt_lens_B: Sequence[int] | torch.Tensor,
    seqlens_B: Sequence[int] | torch.Tensor,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool ``loss_mask_T1`` that is True on positions predicting an answer token.

    A sequence of L tokens whose first P are prompt contributes L-1 entries: P-1 False (predicting
    prompt tokens 1..P-1) then L-P True. Requires ``1 <= P <= L``.
    """
    p = torch.as_tensor(prompt_lens_B, dtype=torch.int64, device=device)
    L = torch.as_tensor(seqlens_B, dtype=torch.int64, device=device)
    if p.shape != L.shape or p.dim() != 1:
        raise ValueError(
            f"prompt_lens_B {tuple(p.shape)} and seqlens_B {tuple(L.shape)} must be 1-D and equal"
        )
    bad = (p < 1) | (p > L)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"need 1 <= prompt_len <= seqlen, got {int(p[i])} and {int(L[i])} at sequence {i}"
        )
    cu1 = cu_seqlens_from_lens(L - 1, device=device)
    pos_T1 = torch.arange(int(cu1[-1]), device=device) - torch.repeat_interleave(cu1[:-1], L - 1)
    return pos_T1 >= torch.repeat_interleave(p - 1, L - 1)


def _next_token_rows(cu_seqlens_B1: torch.Tensor, n_rows: int, device) -> torch.Tensor:
    """The rows of a `[T, ...]` tensor that predict a token (all but each sequence's last)."""
    keep = torch.ones(n_rows, dtype=torch.bool, device=device)
    keep[cu_seqlens_B1[1:].long() - 1] = False
    return keep.nonzero().squeeze(1)


def _check_rows(logits_TV: torch.Tensor, cu_seqlens_B1: torch.Tensor) -> None:
    T = logits_TV.shape[0]
    if int(cu_seqlens_B1[-1]) != T:
        raise ValueError(
            f"logits_TV has {T} rows but cu_seqlens_B1 covers {int(cu_seqlens_B1[-1])}"
        )
    shifted_cu_seqlens(cu_seqlens_B1)  # validates lengths >= 1


def gather_packed_logprobs(
    logits_TV: torch.Tensor,
    input_ids_T: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    shard: Any = None,
) -> torch.Tensor:
    """Log-probs ``logprobs_T1`` (float32) of each next token within each packed sequence.

    Row t of ``logits_TV`` scores token t+1 of the same sequence; the last row of each sequence is
    dropped, so nothing is ever gathered across a sequence boundary. Logits are divided by
    ``temperature``. Works on ``chunk_size`` rows at a time (default: a 256 MiB fp32 chunk), in
    the forward and in the backward, so no fp32 ``[T, V]`` tensor ever exists (see
    :mod:`realflow.algorithms.chunked`). Differentiable with respect to ``logits_TV``.

    With ``shard`` (a model's ``vocab_shard`` under tensor parallelism; None otherwise),
    ``logits_TV`` holds that tp rank's vocab columns and the result, the same on every tp rank,
    is computed without gathering the vocab.
    """
    T = logits_TV.shape[0]
    if input_ids_T.shape != (T,):
        raise ValueError(
            f"logits_TV has {T} rows, input_ids_T shape {tuple(input_ids_T.shape)}, "
            f"cu_seqlens_B1 covers {int(cu_seqlens_B1[-1])}: all must agree"
        )
    _check_rows(logits_TV, cu_seqlens_B1)
    rows = _next_token_rows(cu_seqlens_B1, T, logits_TV.device)
    labels = input_ids_T.long()[rows + 1]
    return rows_logprobs(logits_TV, rows, labels, temperature, chunk_size, shard)


def packed_entropy(
    logits_TV: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    shard: Any = None,
) -> torch.Tensor:
    """``entropy_T1`` (float32): entropy of each next-token distribution, on the rows
    :func:`gather_packed_logprobs` uses; chunked like it, vocab-parallel with ``shard`` like it.
    Differentiable."""
    _check_rows(logits_TV, cu_seqlens_B1)
    rows = _next_token_rows(cu_seqlens_B1, logits_TV.shape[0], logits_TV.device)
    return rows_entropy(logits_TV, rows, temperature, chunk_size, shard)


def sequence_logprobs(
    logprobs_T1: torch.Tensor, loss_mask_T1: torch.Tensor, cu_seqlens_B1: torch.Tensor
) -> torch.Tensor:
    """Sum of per-token log-probs over the answer mask of each sequence: ``logps_B``.

    ``cu_seqlens_B1`` describes the full sequences (L tokens each); differentiable.
    """
    check_same_shape("logprobs_T1", logprobs_T1, "loss_mask_T1", loss_mask_T1)
    masked = logprobs_T1 * loss_mask_T1.to(logprobs_T1.dtype)
    return segment_sum(masked, shifted_cu_seqlens(cu_seqlens_B1))


def last_token_values(values_T: torch.Tensor, cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
    """Value at the last token of each sequence (e.g. a reward model's score): ``values_B``."""
    if int(cu_seqlens_B1[-1]) != values_T.shape[0]:
        raise ValueError(
            f"values_T has {values_T.shape[0]} entries, cu_seqlens_B1 covers {int(cu_seqlens_B1[-1])}"
        )
    shifted_cu_seqlens(cu_seqlens_B1)  # validates lengths >= 1
    return values_T[cu_seqlens_B1[1:].long() - 1]


def split_critic_values(
    values_T: torch.Tensor, cu_seqlens_B1: torch.Tensor, no_eos_mask_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the critic's L values per sequence into ``(values_T1, bootstrap_B)``.

    ``values_T1`` holds the first L-1 values of each sequence: ``V(s_t)`` for the action at
    T1-position t. ``bootstrap_B`` is the value of the state after the last action: 0 when the
    sequence ended with EOS (``no_eos_mask_B`` False, terminal state), the critic's last value when
    it was truncated (``no_eos_mask_B`` True).
    """
    last = last_token_values(values_T, cu_seqlens_B1)
    if no_eos_mask_B.shape != last.shape:
        raise ValueError(
            f"no_eos_mask_B shape {tuple(no_eos_mask_B.shape)} != batch size {last.shape[0]}"
        )
    keep = torch.ones(values_T.shape[0], dtype=torch.bool, device=values_T.device)
    keep[cu_seqlens_B1[1:].long() - 1] = False
    return values_T[keep], last * no_eos_mask_B.to(last.dtype)


def broadcast_to_tokens(
    values_B: torch.Tensor, loss_mask_T1: torch.Tensor, cu_seqlens_B1: torch.Tensor
) -> torch.Tensor:
    """Copy one value per sequence onto that sequence's answer positions: ``values_T1``.

    Positions where ``loss_mask_T1`` is 0 get 0.
    """
    cu1 = shifted_cu_seqlens(cu_seqlens_B1)
    if values_B.shape[0] != cu1.numel() - 1 or int(cu1[-1]) != loss_mask_T1.shape[0]:
        raise ValueError(
            f"values_B has {values_B.shape[0]} entries, loss_mask_T1 {loss_mask_T1.shape[0]}; "
            f"cu_seqlens_B1 describes {cu1.numel() - 1} sequences and {int(cu1[-1])} T1 positions"
        )
    return values_B[segment_ids(cu1)] * loss_mask_T1.to(values_B.dtype)


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise ValueError naming both tensors if their shapes differ."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {tuple(a.shape)} != {name_b} shape {tuple(b.shape)}")
