"""Losses the training interfaces take by name (`sft.loss`, `dpo.loss`, `rw.loss`), and what
each one is called with.

A loss returns one value per unit of its interface (a token, a pair); the interface weighs and
averages them, so every loss is exact however a batch is cut into micro-batches (the engine
weighs micro-batch i by its share of the units, see realflow.engines.train). A loss may also
return `(values, stats)` with a dict of floats to log.

| registry | interface | signature |
| --- | --- | --- |
| `SFT_LOSSES` | `sft` | `fn(inp: TokenLossInput) -> loss_T1` per predicted token |
| `DPO_LOSSES` | `dpo` | `fn(inp: DPOLossInput) -> loss_P` per preference pair |
| `RW_LOSSES` | `paired_rw` | `fn(inp: RWLossInput) -> loss_P` per preference pair |

The SFT loss is `sum_t loss_scale_t * loss_t / n` over the tokens whose loss scale is > 0 (`n` of
them in the whole batch): the NLL of the answer tokens by default, ms-swift's weighting when the
data carry a `loss_scale`. DPO averages over pairs; the reward model over samples of the mean
over each sample's pairs. A loss of your own:

    # my_losses.py; run with sft.loss=focal plugins=[my_losses.py]
    from realflow.api.registry import SFT_LOSSES

    @SFT_LOSSES.register("focal")
    def focal(inp):
        p = inp.logprobs_T1.exp()
        return -((1 - p) ** 2) * inp.logprobs_T1
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from realflow.algorithms.preference import DPO_LOSSES as DPO_LOSS_MATH
from realflow.api.registry import DPO_LOSSES, RW_LOSSES, SFT_LOSSES


@dataclasses.dataclass
class TokenLossInput:
    """One micro-batch as an SFT loss sees it (T1: one entry per predicted token, the layout of
    realflow.algorithms.packed; sequence i's entries follow `cu_seqlens_B1[i] - i`).

    `logits_TV` are the model's raw logits (model dtype; row t of a sequence predicts token t+1,
    the last row of each sequence predicts nothing; `shifted_logits()` keeps the T1 rows).
    `logprobs_T1` (float32) are the log-probs of the tokens that follow; `loss_scale_T1` the
    weight of each (0 on prompt tokens). Gradients flow through `logits_TV` and `logprobs_T1`.

    Under tensor parallelism `vocab_shard` (a `realflow.parallel.tp.VocabShard`) is set and
    `logits_TV` hold only this rank's vocab columns [vocab_shard.start, vocab_shard.stop): a
    loss that reads the logits must combine them over `vocab_shard.group` (see
    realflow.algorithms.chunked); `logprobs_T1` are already the full ones.
    """

    logits_TV: torch.Tensor
    logprobs_T1: torch.Tensor
    loss_scale_T1: torch.Tensor
    input_ids_T: torch.Tensor
    cu_seqlens_B1: torch.Tensor
    vocab_shard: Any = None

    def shifted_logits(self) -> torch.Tensor:
        """`logits_T1V`: the rows of `logits_TV` that predict a token (a copy)."""
        keep = torch.ones(self.logits_TV.shape[0], dtype=torch.bool, device=self.logits_TV.device)
        keep[self.cu_seqlens_B1[1:].long() - 1] = False
        return self.logits_TV[keep]

    def target_ids_T1(self) -> torch.Tensor:
        """The token each T1 row predicts."""
        keep = torch.ones(
            self.input_ids_T.shape[0], dtype=torch.bool, device=self.input_ids_T.device
        )
        keep[self.cu_seqlens_B1[:-1].long()] = False
        return self.input_ids_T[keep]


@dataclasses.dataclass
class DPOLossInput:
    """P preference pairs as a DPO loss sees them. Sequence log-probs are sums of
    `loss_scale * log p` over each answer; reference ones are constants. `*_tokens_P` count the
    tokens with a loss scale > 0 (for length-normalised losses)."""

    pi_chosen_P: torch.Tensor
    pi_rejected_P: torch.Tensor
    ref_chosen_P: torch.Tensor
    ref_rejected_P: torch.Tensor
    chosen_tokens_P: torch.Tensor
    rejected_tokens_P: torch.Tensor
    beta: float
    label_smoothing: float

    def logits_P(self) -> torch.Tensor:
        """`(pi_c - pi_r) - (ref_c - ref_r)`: the implicit reward margin over beta."""
        return (self.pi_chosen_P - self.pi_rejected_P) - (self.ref_chosen_P - self.ref_rejected_P)


@dataclasses.dataclass
class RWLossInput:
    """P preference pairs of reward-model scores (last-token values of each sequence)."""

    chosen_P: torch.Tensor
    rejected_P: torch.Tensor


def call_loss(fn: Any, inp: Any, n: int, name: str) -> tuple[torch.Tensor, dict[str, float]]:
    """`fn(inp)` as (values, stats); the values must have `n` entries."""
    out = fn(inp)
    values, stats = out if isinstance(out, tuple) else (out, {})
    if not isinstance(values, torch.Tensor) or values.shape != (n,):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"loss '{name}' must return one value per unit, shape ({n},); got {got}")
    detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in stats.items()}
    return values, {k: float(v) for k, v in detached.items()}


# ---- the built-in losses ------------------------------------------------------------------------


@SFT_LOSSES.register("nll")
def nll(inp: TokenLossInput) -> torch.Tensor:
    """Negative log-likelihood of each predicted token (cross entropy)."""
    return -inp.logprobs_T1


def _dpo_loss(kind: str) -> Any:
    def loss(inp: DPOLossInput) -> torch.Tensor:
        return DPO_LOSS_MATH[kind](inp.logits_P(), inp.beta, inp.label_smoothing)

    loss.__doc__ = f"The '{kind}' DPO loss of realflow.algorithms.preference.dpo_loss."
    loss.__qualname__ = loss.__name__ = f"dpo_{kind}"
    return loss


DPO_LOSSES.register("sigmoid", _dpo_loss("sigmoid"))
DPO_LOSSES.register("ipo", _dpo_loss("ipo"))


@RW_LOSSES.register("bradley_terry")
def bradley_terry(inp: RWLossInput) -> torch.Tensor:
    """`-logsigmoid(chosen - rejected)` of each pair."""
    return -F.logsigmoid(inp.chosen_P - inp.rejected_P)
