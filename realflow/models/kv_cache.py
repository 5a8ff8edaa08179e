"""A preallocated per-sequence KV cache for generating over a packed batch.

Layout: `k`, `v` of shape (n_layers, B, K, L_max, D); row b holds sequence b's keys in slots
0..lens_B[b]-1. Prefill writes the packed prompt keys straight into their rows (the prompt is
never padded in compute); each decode step writes one slot per active row and attends over the
first `max(lens)+1` slots with a per-row length mask. Finished rows are dropped by compacting the
active rows to the front (`keep`), so later steps neither compute nor attend for them.

The static engine (realflow.models.static_decode) uses `start_static_step` instead: rows never
move, every row appends at its own position (a device buffer), and attention covers a fixed
number of slots, so a step has fixed shapes and no host sync (it can be a CUDA graph).
"""

from __future__ import annotations

import torch

from realflow.models.attention import PackedSeqs, decode_attention


class KVCache:
    """Keys/values of every layer for a batch of sequences being generated."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self._k = torch.zeros(shape, dtype=dtype, device=device)
        self._v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_rows = batch
        self.max_len = max_len
        self.lens_B = torch.zeros(batch, dtype=torch.long, device=device)
        self._max_used = 0
        self.decoding = False
        self._n_kv_heads, self._head_dim = n_kv_heads, head_dim
        self._write_index: torch.Tensor | None = None  # flat slot of each (token, kv head)
        self._group = 1
        self._mask_B11L: torch.Tensor | None = None
        self._attend_len: int | None = None  # set by start_static_step

    # ------------------------------------------------------------------------------ prefill

    def start_prefill(self, seqs: PackedSeqs, position_ids_T: torch.Tensor, group: int = 1) -> None:
        """Prepare to store a packed prompt batch: sequence i goes to row i * group (so
        B * group == n_rows); `share_prefill` then copies it to the group's other rows."""
        if len(seqs.seqlens) * group != self.n_rows or seqs.max_seqlen > self.max_len:
            raise ValueError(
                f"prefill of {len(seqs.seqlens)} sequences x {group} (longest {seqs.max_seqlen}) "
                f"does not fit a cache of {self.n_rows} rows x {self.max_len} slots"
            )
        device = self.lens_B.device
        lens = torch.tensor(seqs.seqlens, device=device)
        rows = torch.arange(0, self.n_rows, group, device=device)
        self._write_index = self._flat_index(torch.repeat_interleave(rows, lens), position_ids_T)
        self.lens_B = lens.repeat_interleave(group)
        self._max_used = seqs.max_seqlen
        self._group = group
        self.decoding = False

    def share_prefill(self) -> None:
        """After a grouped prefill: every row of a group gets its first row's keys/values."""
        g, used = self._group, self._max_used
        if g == 1:
            return
        b = self.n_rows // g
        for cache in (self._k, self._v):
            view = cache[:, :, :, :used].unflatten(1, (b, g))  # (layers, B, g, K, used, D)
            view[:, :, 1:] = view[:, :, :1]

    def _flat_index(self, row_N: torch.Tensor, pos_N: torch.Tensor) -> torch.Tensor:
        """Row index into a layer's cache viewed as (B * K * L_max, D), for every (n, kv head).

        One `index_copy_` on that view is much cheaper on CPU than advanced-index assignment.
        """
        heads = torch.arange(self._n_kv_heads, device=row_N.device)
        return (
            (row_N[:, None] * self._n_kv_heads + heads) * self.max_len + pos_N[:, None]
        ).reshape(-1)

    def _write(self, layer: int, k_NKD: torch.Tensor, v_NKD: torch.Tensor) -> None:
        d = self._head_dim
        self._k[layer].view(-1, d).index_copy_(
            0, self._write_index, k_NKD.reshape(-1, d).to(self._k.dtype)
        )
        self._v[layer].view(-1, d).index_copy_(
            0, self._write_index, v_NKD.reshape(-1, d).to(self._v.dtype)
        )

    def store_prefill(self, layer: int, k_TKD: torch.Tensor, v_TKD: torch.Tensor) -> None:
        self._write(layer, k_TKD, v_TKD)

    # ------------------------------------------------------------------------------- decode

    def start_decode_step(self) -> torch.Tensor:
        """Begin a step that appends one token per active row; returns its positions (B,)."""
        if self._max_used + 1 > self.max_len:
            raise ValueError(f"KV cache is full ({self.max_len} slots)")
        self.decoding = True
        length = self._max_used + 1
        slots = torch.arange(length, device=self.lens_B.device)
        self._mask_B11L = (slots[None, :] <= self.lens_B[:, None])[:, None, None, :]
        rows_B = torch.arange(self.n_rows, device=self.lens_B.device)
        self._write_index = self._flat_index(rows_B, self.lens_B)
        return self.lens_B

    def start_static_step(self, positions_B: torch.Tensor, attend_len: int) -> None:
        """Begin a fixed-shape step: row b appends at slot `positions_B[b]` and attends over
        slots 0..positions_B[b] of the first `attend_len`; nothing here reads the host."""
        self.decoding = True
        self._attend_len = attend_len
        slots = torch.arange(attend_len, device=positions_B.device)
        self._mask_B11L = (slots[None, :] <= positions_B[:, None])[:, None, None, :]
        rows_B = torch.arange(self.n_rows, device=positions_B.device)
        self._write_index = self._flat_index(rows_B, positions_B)

    def attend_decode(
        self,
        layer: int,
        q_BHD: torch.Tensor,
        k_BKD: torch.Tensor,
        v_BKD: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Store this step's key/value of every active row and attend over its row; `out_BHD`."""
        self._write(layer, k_BKD, v_BKD)
        k_cache = self._k[layer, : self.n_rows]
        v_cache = self._v[layer, : self.n_rows]
        length = self._max_used + 1 if self._attend_len is None else self._attend_len
        return decode_attention(
            q_BHD,
            k_cache[:, :, :length],
            v_cache[:, :, :length],
            self._mask_B11L,
            scale,
        ).to(q_BHD.dtype)

    def end_decode_step(self) -> None:
        self.lens_B = self.lens_B + 1
        self._max_used += 1

    def keep(self, rows_N: torch.Tensor) -> None:
        """Keep only the rows `rows_N` (ascending indices), moved to the front of the cache."""
        n = rows_N.numel()
        used = self._max_used
        if n:
            self._k[:, :n, :, :used] = self._k[:, rows_N, :, :used]
            self._v[:, :n, :, :used] = self._v[:, rows_N, :, :used]
            self.lens_B = self.lens_B[rows_N]
            self._max_used = int(self.lens_B.max())
        self.n_rows = n

    def nbytes(self) -> int:
        return 2 * self._k.numel() * self._k.element_size()
