"""Masked statistics, advantage whitening and a running mean/std normaliser."""

from __future__ import annotations

import torch

from realflow.algorithms.packed import check_same_shape


def masked_sum(x_T: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Sum of ``x_T`` over positions where ``mask_T`` is non-zero (mask used as a weight)."""
    check_same_shape("x", x_T, "mask", mask_T)
    return (x_T * mask_T.to(x_T.dtype)).sum()


def masked_mean(x_T: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """Mean of ``x_T`` over the mask (a scalar); 0 when the mask is empty. Differentiable."""
    m = mask_T.to(x_T.dtype)
    return masked_sum(x_T, mask_T) / m.sum().clamp_min(1.0)


def first_masked(x_T: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    """The first value of ``x_T`` where ``mask_T`` is non-zero (0 when there is none), detached.

    Centring ``x - first`` before taking a mean makes constant values centre to exactly 0: a float
    sum of n equal values divided by n is not exactly that value (8 x 2.9 in float32), and a
    whitening or group normalisation turns that residue into a visible advantage.
    """
    if x_T.numel() == 0:
        return x_T.new_zeros(())
    nonzero_T = mask_T != 0
    i = nonzero_T.to(torch.int32).argmax()
    return torch.where(nonzero_T[i], x_T[i], torch.zeros_like(x_T[i])).detach()


def masked_var(x_T: torch.Tensor, mask_T: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x_T`` over the mask (a scalar). ``unbiased`` uses n-1 in the denominator.

    Returns 0 when fewer than 2 (unbiased) or 1 (biased) positions are masked in, and exactly 0
    when the masked-in values are all equal.
    """
    m = mask_T.to(x_T.dtype)
    n = m.sum()
    d_T = x_T - first_masked(x_T, mask_T)
    mean = masked_sum(d_T, mask_T) / n.clamp_min(1.0)
    ss = ((d_T - mean) ** 2 * m).sum()
    denom = n - 1 if unbiased else n
    return torch.where(denom > 0, ss / denom.clamp_min(1.0), torch.zeros_like(ss))


def masked_whiten(
    x_T: torch.Tensor,
    mask_T: torch.Tensor,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Whiten ``x_T`` with its masked mean/variance: ``(x - mean) / sqrt(var + eps)``.

    With ``shift_mean=False`` the mean is added back (scale only). Masked-out positions are set to
    0, so the result can be used directly as advantages. Equal masked-in values whiten to exactly
    0 (or, with ``shift_mean=False``, to themselves). Shape ``[T]`` in and out.
    """
    first = first_masked(x_T, mask_T)
    d_T = x_T - first
    mean_d = masked_mean(d_T, mask_T)
    var = masked_var(x_T, mask_T, unbiased=unbiased)
    out = (d_T - mean_d) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + (first + mean_d)
    return out * mask_T.to(x_T.dtype)


class RunningMeanStd:
    """Running mean and (population) variance of a scalar stream, merged exactly (Chan et al.).

    After updates with batches ``x_1..x_k`` the mean/var equal those of ``cat(x_1..x_k)``. Statistics
    are kept in float64 on CPU. ``normalize(x) = (x - mean) / sqrt(var + eps)``, and
    ``denormalize`` is its exact inverse. Before the first update mean is 0 and var is 1.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        self.eps = eps
        self.mean = torch.zeros((), dtype=torch.float64)
        self.var = torch.ones((), dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, x_T: torch.Tensor, mask_T: torch.Tensor | None = None) -> None:
        """Fold the entries of ``x_T`` (any shape; only where ``mask_T`` is True) into the stats."""
        x = x_T.detach().reshape(-1).to("cpu", torch.float64)
        if mask_T is not None:
            check_same_shape("x", x_T, "mask", mask_T)
            x = x[mask_T.detach().reshape(-1).to("cpu").bool()]
        n_b = x.numel()
        if n_b == 0:
            return
        d = x - x[0]  # centred on a member: a constant batch has mean x[0] and m2 0 exactly
        mean_d = d.mean()
        mean_b = x[0] + mean_d
        m2_b = ((d - mean_d) ** 2).sum()
        if self.count == 0:
            self.mean, self.var, self.count = mean_b, m2_b / n_b, n_b
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        m2 = self.var * n_a + m2_b + delta**2 * (n_a * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.var = m2 / n
        self.count = n

    @property
    def std(self) -> torch.Tensor:
        """``sqrt(var + eps)``, the scale used by normalize/denormalize (float64 scalar)."""
        return torch.sqrt(self.var + self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` in the dtype and device of ``x``."""
        mean = self.mean.to(x.device, x.dtype)
        return (x - mean) / self.std.to(x.device, x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x * std + mean`` in the dtype and device of ``x``."""
        return x * self.std.to(x.device, x.dtype) + self.mean.to(x.device, x.dtype)

    def state_dict(self) -> dict[str, float | int]:
        """Plain-Python state for checkpoints (float64 values round-trip exactly)."""
        return {
            "mean": float(self.mean),
            "var": float(self.var),
            "count": self.count,
            "eps": self.eps,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self.mean = torch.tensor(float(state["mean"]), dtype=torch.float64)
        self.var = torch.tensor(float(state["var"]), dtype=torch.float64)
        self.count = int(state["count"])
        self.eps = float(state["eps"])
