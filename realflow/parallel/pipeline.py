"""Pipeline parallelism: one stage's part of micro-batched forward and forward-backward passes.

    runner = PipelineRunner(stage_model, groups)
    # train: every stage passes the same micro-batches; loss_fn runs on the last stage only
    results = runner.forward_backward(mbs, inputs_fn, loss_fn, scales)     # 1F1B schedule
    # inference: output_fn runs on the last stage, which alone returns the outputs
    outs = runner.forward(mbs, inputs_fn, output_fn)

`inputs_fn(mb) -> (input_ids_T, cu_seqlens_B1)` on the model's device. `loss_fn(module, mb) ->
(loss, stats)` and `output_fn(module, mb) -> tensor` are the interfaces' usual functions: the
`module` they get is the last stage, whose `module(ids_T, cu_B1)` continues from the hidden
states received for that micro-batch, so they run unchanged. Activations `h_TD` move between
neighbouring stages with p2p over the pipeline group; every stage knows each micro-batch's
token count, so no shapes are exchanged. Call inside the engine's autocast when it has one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from realflow.models.transformer import PackedTransformer
from realflow.parallel.groups import MeshGroups

InputsFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


class StageModule:
    """The last stage as the interfaces see it: `module(ids_T, cu_B1)` runs it on the hidden
    states received from the previous stage; other attributes are the model's."""

    def __init__(self, model: PackedTransformer, h_TD: torch.Tensor | None):
        self._model, self._h_TD = model, h_TD

    def __call__(self, input_ids_T: torch.Tensor, cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
        return self._model(input_ids_T, cu_seqlens_B1, h_TD=self._h_TD)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class PipelineRunner:
    """Runs `model` (one pipeline stage, built with a ShardSpec) in its mesh's pipeline."""

    def __init__(self, model: PackedTransformer, groups: MeshGroups):
        spec = model.shard
        if spec is None or spec.pp_size == 1 or not groups.member:
            raise ValueError("PipelineRunner needs a pipeline stage (pp > 1) of a mesh member")
        self.model, self.groups = model, groups
        self.stage, self.n_stages = spec.pp_stage, spec.pp_size
        ranks = groups.pp_ranks
        self.prev = ranks[self.stage - 1] if self.stage > 0 else None
        self.next = ranks[self.stage + 1] if self.stage + 1 < self.n_stages else None
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.hidden = model.config.hidden_size

    @property
    def is_last(self) -> bool:
        return self.next is None

    # ---- p2p ----------------------------------------------------------------------------

    def _exchange(
        self,
        send_next: torch.Tensor | None = None,
        send_prev: torch.Tensor | None = None,
        recv_prev: int | None = None,
        recv_next: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Post the given sends and receives (token counts for receives) together and wait:
        returns (tensor from prev, tensor from next)."""
        g, p2p = self.groups.pp_group, []
        from_prev = from_next = None
        if send_next is not None and self.next is not None:
            p2p.append(dist.P2POp(dist.isend, send_next.detach().contiguous(), self.next, g))
        if send_prev is not None and self.prev is not None:
            p2p.append(dist.P2POp(dist.isend, send_prev.contiguous(), self.prev, g))
        if recv_prev is not None and self.prev is not None:
            from_prev = self._buffer(recv_prev)
            p2p.append(dist.P2POp(dist.irecv, from_prev, self.prev, g))
        if recv_next is not None and self.next is not None:
            from_next = self._buffer(recv_next)
            p2p.append(dist.P2POp(dist.irecv, from_next, self.next, g))
        for work in dist.batch_isend_irecv(p2p) if p2p else []:
            work.wait()
        return from_prev, from_next

    def _buffer(self, n_tokens: int) -> torch.Tensor:
        return torch.empty(n_tokens, self.hidden, dtype=self.dtype, device=self.device)

    # ---- schedules ----------------------------------------------------------------------

    def forward(self, micro_batches: Sequence[Any], inputs_fn: InputsFn, output_fn) -> list:
        """Forward every micro-batch through the pipeline (no backward). The last stage returns
        `[output_fn(stage_module, mb) for mb]`; other stages return []."""
        outs, pending = [], []
        for mb in micro_batches:
            ids_T, cu_B1 = inputs_fn(mb)
            x, _ = self._exchange(recv_prev=ids_T.numel())
            if self.is_last:
                outs.append(output_fn(StageModule(self.model, x), mb))
            else:
                y = self.model(ids_T, cu_B1, h_TD=x)
                pending += dist.batch_isend_irecv(
                    [dist.P2POp(dist.isend, y.to(self.dtype), self.next, self.groups.pp_group)]
                )
        for work in pending:
            work.wait()
        return outs

    def forward_backward(
        self,
        micro_batches: Sequence[Any],
        inputs_fn: InputsFn,
        loss_fn: Callable[[Any, Any], tuple[torch.Tensor, dict[str, float]]],
        scales: Sequence[float],
    ) -> list[tuple[float, dict[str, float]]]:
        """Forward and backward of every micro-batch with the 1F1B schedule; the gradient is that
        of `sum_i scales[i] * loss_i`. Returns `(loss_i, stats_i)` on the last stage, [] on the
        others. A tied embedding's two copies (first and last stage) get their summed grads."""
        if len(scales) != len(micro_batches):
            raise ValueError(f"{len(scales)} scales for {len(micro_batches)} micro-batches")
        n = len(micro_batches)
        tokens = [inputs_fn(mb)[0].numel() for mb in micro_batches]
        results: list[tuple[float, dict[str, float]]] = []

        def fwd(i: int, x: torch.Tensor | None) -> torch.Tensor:
            mb = micro_batches[i]
            if self.is_last:
                loss, stats = loss_fn(StageModule(self.model, x), mb)
                results.append((float(loss.detach()), stats))
                return loss * scales[i]
            ids_T, cu_B1 = inputs_fn(mb)
            return self.model(ids_T, cu_B1, h_TD=x)

        def bwd(x, y, grad_y) -> torch.Tensor | None:
            torch.autograd.backward(y, grad_tensors=grad_y)
            return None if x is None else x.grad

        def recv_input(i: int) -> torch.Tensor | None:
            x, _ = self._exchange(recv_prev=tokens[i])
            return None if x is None else x.requires_grad_()

        warmup = min(self.n_stages - self.stage - 1, n)
        steady = n - warmup
        inflight: deque = deque()
        for i in range(warmup):
            x = recv_input(i)
            y = fwd(i, x)
            self._exchange(send_next=y)
            inflight.append((x, y))
        x = recv_input(warmup) if steady > 0 else None
        for k in range(steady):
            i = warmup + k
            y = fwd(i, x)
            _, grad_y = self._exchange(send_next=y, recv_next=None if self.is_last else tokens[k])
            inflight.append((x, y))
            x0, y0 = inflight.popleft()
            grad_x = bwd(x0, y0, grad_y)
            if k == steady - 1:
                self._exchange(send_prev=grad_x)
            else:
                x, _ = self._exchange(send_prev=grad_x, recv_prev=tokens[i + 1])
                x = None if x is None else x.requires_grad_()
        for k in range(warmup):
            x0, y0 = inflight.popleft()
            _, grad_y = self._exchange(recv_next=tokens[steady + k])
            self._exchange(send_prev=bwd(x0, y0, grad_y))
        self.sync_tied_grads()
        return results

    def sync_tied_grads(self) -> None:
        """Sum the gradients of a tied embedding's copies on the first and last stage (an LM
        head only: a critic or reward head ties nothing, whatever the config says)."""
        model = self.model
        tied = model.config.tie_word_embeddings and model.head == "lm"
        if not tied or self.groups.embed_group is None:
            return
        weight = model.embed_tokens.weight if self.stage == 0 else None
        if self.is_last and model.lm_head is not None:
            weight = model.lm_head.weight
        if weight is None:
            return
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(weight.grad, group=self.groups.embed_group)
