"""Evaluation: the experiment's evaluation graph, run over the eval dataset between steps.

Every `eval_freq_steps` steps (and after the last one) the runner stops at a step boundary, as
for a checkpoint (no call in flight), and runs `cfg.eval_dfg()` with a master of its own on the
same workers: one pass over the eval dataset (`eval_dataset.*`), batch by batch, each call
reading the weights of the step just finished. The stats of its calls are averaged over the
batches (weighted by batch size) and become part of that step's metrics row:
`eval/<mfc>/<stat>` for every call, and `eval/<stat>` for the evaluate calls (e.g.
`eval/loss`, `eval/reward/mean`); a `ppl` is exp of the averaged `nll` (or `loss`).
Nothing of the training state changes: the training loader,
the interfaces of the training graph and the weights are untouched, so a run with evaluation
trains exactly like one without.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from realflow.api.dfg import DataflowGraph, InterfaceType
from realflow.system.master import Master
from realflow.system.observe import Tracer
from realflow.system.transport import Transport

logger = logging.getLogger(__name__)


WEIGHT = "weight"  # an evaluate call's weight of its means (not a stat of its own)


class Evaluation:
    def __init__(
        self,
        dfg: DataflowGraph,
        transport: Transport,
        where: dict[str, int],
        data_worker: int,
        tracer: Tracer,
        freq_steps: int,
        total_steps: int,
        n_batches: int,
        batch_sizes: list[int],
        mfc_timeout_s: float = 0.0,
    ):
        missing = sorted({m.model_name for m in dfg.mfcs} - set(where))
        if missing:
            raise ValueError(
                f"the evaluation graph uses roles {missing} that the training graph does not"
            )
        self.dfg = dfg
        self.transport = transport
        self.where = where
        self.data_worker = data_worker
        self.tracer = tracer
        self.freq = freq_steps
        self.total_steps = total_steps
        self.n_batches = n_batches
        self.batch_sizes = batch_sizes
        self.timeout = mfc_timeout_s
        self.evaluate_mfcs = {
            m.name for m in dfg.mfcs if m.interface_type == InterfaceType.EVALUATE
        }

    def due(self, step: int) -> bool:
        return self.freq > 0 and (step % self.freq == 0 or step == self.total_steps)

    def run(self, step: int) -> dict[str, float]:
        """One pass over the eval dataset with the weights after `step`: the `eval/...` stats."""
        if self.n_batches == 0:
            logger.warning("evaluation at step %d: the eval dataset is empty", step)
            return {}
        per_batch: list[dict[str, dict[str, float]]] = []
        master = Master(
            self.dfg,
            self.transport,
            self.where,
            self.data_worker,
            self.timeout,
            on_call=lambda r: self.tracer.record(
                dataclasses.replace(r, step=step), self.dfg.mfc(r.mfc).n_seqs
            ),
            fetch_payload=lambda batch: ("eval", batch - 1),
        )
        master.run(
            1,
            self.n_batches,
            lambda batch, stats, _dt: per_batch.append(stats),
            lambda batch: False,
            lambda batch: None,
        )
        return self._row(per_batch)

    def _row(self, per_batch: list[dict[str, dict[str, float]]]) -> dict[str, float]:
        weights = self.batch_sizes[: len(per_batch)]
        sums: dict[str, float] = {}
        norms: dict[str, float] = {}
        for stats, size in zip(per_batch, weights):
            for mfc, values in stats.items():
                w = float(values.get(WEIGHT, size))
                for k, v in values.items():
                    if k == WEIGHT:
                        continue
                    for key in _keys(mfc, k, mfc in self.evaluate_mfcs):
                        sums[key] = sums.get(key, 0.0) + w * float(v)
                        norms[key] = norms.get(key, 0.0) + w
        row = {k: sums[k] / norms[k] for k in sums}
        for key in [k for k in row if k.endswith("/ppl")]:
            # A perplexity is exp of the mean NLL (or loss), not a mean of perplexities.
            base = key[: -len("ppl")]
            nll = row.get(base + "nll", row.get(base + "loss"))
            if nll is not None:
                row[key] = math.exp(min(nll, 50.0))
        return row


def _keys(mfc: str, stat: str, headline: bool) -> list[str]:
    return [f"eval/{mfc}/{stat}", f"eval/{stat}"] if headline else [f"eval/{mfc}/{stat}"]


def batch_sizes(n_rows: int, batch_size: int, n_batches: int) -> list[int]:
    """Sizes of the first `n_batches` batches of an eval dataset of `n_rows` rows."""
    return [min(batch_size, n_rows - i * batch_size) for i in range(n_batches)]


def setup_info(results: list[Any]) -> dict[str, int]:
    """The data worker's answer to SETUP (eval batch count and rows)."""
    for r in results:
        if isinstance(r, dict) and r:
            return r
    return {}
