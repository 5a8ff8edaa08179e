"""The static decode engine: fixed-shape decode steps, replayed as CUDA graphs on a GPU.

`generate(..., GenerationConfig(engine="static"))` (the default on CUDA) runs the same packed
prefill as the eager engine, then every decode step over the whole batch with buffers that
never change shape or move:
- the KV cache rows stay where the prefill put them (no copy when a sequence finishes); a
  finished row keeps decoding, masked out of the output, so the batch stays dense;
- the step reads its input token and position from device buffers and writes its sample, its
  log-probs and the stop bookkeeping into device buffers: the host never waits on a token
  (it checks whether every row has stopped once every `CHECK_EVERY` steps);
- attention covers a fixed number of cache slots, rounded up to `attend_block`, so one step
  shape serves `attend_block` consecutive steps; on CUDA each shape (attention slots, and
  whether stop tokens are still banned by `min_new_tokens`) is captured once as a CUDA graph
  and replayed. All graphs of a call share one memory pool.

On a CPU the same step runs eagerly (graphs are CUDA only), which is how the tests compare it
with the eager engine. Sampling draws a uniform for every row each step (`pick_tokens`), so both
engines give the same tokens under one seed; on CUDA the graph's RNG offsets differ from an
eager run, so the draws are equal in distribution, not token for token.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from realflow.models.attention import PackedSeqs
from realflow.models.generation import GenerationConfig, pick_tokens
from realflow.models.kv_cache import KVCache
from realflow.models.transformer import PackedTransformer

logger = logging.getLogger(__name__)

CHECK_EVERY = 16  # decode steps between host checks of "has every row stopped"
ATTEND_BLOCK = 256  # attention slots are rounded up to a multiple of this


class StaticDecoder:
    """Decode state of one `generate` call in fixed device buffers (see the module docstring).

    Outputs after `run`: `tokens_NB`, `logp_NB`, `plain_NB` (step x row; valid up to
    `lens_B`), `lens_B` (new tokens per row, stop token included) and `stopped_B`.
    """

    def __init__(
        self,
        model: PackedTransformer,
        cache: KVCache,
        gconfig: GenerationConfig,
        generator: torch.Generator | None,
        stop_ids: torch.Tensor,
        use_graphs: bool,
        attend_block: int = ATTEND_BLOCK,
    ):
        b, n, device = cache.n_rows, gconfig.max_new_tokens, cache.lens_B.device
        self.model, self.cache, self.gconfig = model, cache, gconfig
        self.generator, self.stop_ids = generator, stop_ids
        self.use_graphs, self.attend_block = use_graphs, attend_block
        self.tok_B = torch.zeros(b, dtype=torch.long, device=device)
        self.pos_B = cache.lens_B.clone()  # where each row writes its next key/value
        self.step_1 = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens_NB = torch.zeros(n, b, dtype=torch.long, device=device)
        self.logp_NB = torch.zeros(n, b, dtype=torch.float32, device=device)
        self.plain_NB = torch.zeros(n, b, dtype=torch.float32, device=device)
        self.lens_B = torch.zeros(b, dtype=torch.long, device=device)
        self.alive_B = torch.ones(b, dtype=torch.bool, device=device)
        self.stopped_B = torch.zeros(b, dtype=torch.bool, device=device)
        self.seqs = PackedSeqs(torch.arange(b + 1, dtype=torch.int32, device=device), [1] * b, 1)
        self.prompt_max = int(cache.lens_B.max())
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._warm = False
        self.capture_s = 0.0  # host time spent capturing graphs (logged at debug level)

    # ------------------------------------------------------------------------- the step body

    def record(self, logits_BV: torch.Tensor, banned: bool) -> None:
        """Sample every row from `logits_BV` and store the step's results (device only)."""
        step = 0 if banned else self.gconfig.min_new_tokens
        tok_B, logp_B, plain_B = pick_tokens(
            logits_BV, step, self.stop_ids, self.gconfig, self.generator
        )
        self.tokens_NB.index_copy_(0, self.step_1, tok_B[None])
        self.logp_NB.index_copy_(0, self.step_1, logp_B[None].float())
        self.plain_NB.index_copy_(0, self.step_1, plain_B[None].float())
        self.lens_B += self.alive_B
        # Not torch.isin: for a batch over ~10 rows it sorts through torch.unique, which waits
        # for the host (and so cannot be captured).
        is_stop_B = (tok_B[:, None] == self.stop_ids[None, :]).any(-1)
        hit_B = is_stop_B & self.alive_B
        self.stopped_B |= hit_B
        self.alive_B &= ~hit_B
        self.tok_B.copy_(tok_B)
        self.step_1 += 1

    def body(self, attend_len: int, banned: bool) -> None:
        """One decode step of every row: what a CUDA graph captures."""
        self.cache.start_static_step(self.pos_B, attend_len)
        h_BD = self.model.hidden_states(self.tok_B, self.seqs, self.pos_B, cache=self.cache)
        self.record(self.model.lm_head(h_BD), banned)
        self.pos_B += 1

    # ------------------------------------------------------------------------------ driving

    def attend_len(self, i: int) -> int:
        """Cache slots decode step `i` (>= 1) attends over: the longest row then holds
        prompt_max + i keys; rounded up to `attend_block`, at most the cache size."""
        need = self.prompt_max + i
        return min(self.cache.max_len, -(-need // self.attend_block) * self.attend_block)

    def step(self, i: int) -> None:
        key = (self.attend_len(i), i < self.gconfig.min_new_tokens)
        if not self.use_graphs:
            self.body(*key)
            return
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
        elif not self._warm:  # the first step runs eagerly on a side stream: the warm-up
            self._warm = True
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.body(*key)
            torch.cuda.current_stream().wait_stream(side)
        else:
            start = time.perf_counter()
            self._graphs[key] = self._capture(key)
            self.capture_s += time.perf_counter() - start
            self._graphs[key].replay()

    def _capture(self, key: tuple[int, bool]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None and not self.gconfig.greedy:
            if not hasattr(graph, "register_generator_state"):
                raise ValueError(
                    "sampling with a torch.Generator inside a CUDA graph needs "
                    "CUDAGraph.register_generator_state (torch >= 2.5); pass generator=None "
                    "(the default CUDA generator) or GenerationConfig(cuda_graphs=False)"
                )
            graph.register_generator_state(self.generator)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # thread_local: another worker thread's CUDA calls during the capture are no error.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self.body(*key)
        return graph

    def run(self, first_logits_BV: torch.Tensor) -> None:
        """Sample new token 0 from the prefill's logits, then decode until every row stopped
        or max_new_tokens."""
        self.record(first_logits_BV, self.gconfig.min_new_tokens > 0)
        for i in range(1, self.gconfig.max_new_tokens):
            if i % CHECK_EVERY == 0 and not bool(self.alive_B.any()):
                break
            self.step(i)
        if self._graphs:
            logger.debug(
                "%d decode graphs (attention slots, stop tokens banned): %s, captured in %.3f s",
                len(self._graphs),
                sorted(self._graphs),
                self.capture_s,
            )


def static_decode_loop(
    model: PackedTransformer,
    input_ids_T: torch.Tensor,
    seqs: PackedSeqs,
    cache: KVCache,
    gconfig: GenerationConfig,
    generator: torch.Generator | None,
    stop_ids: torch.Tensor,
    n_per_prompt: int,
):
    """Prefill, then `StaticDecoder.run`. Returns what the eager `_decode_loop` returns:
    tokens_BN, logprobs_BN, plain_logprobs_BN (valid up to lens_B), lens_B, stopped_B."""
    positions_T = seqs.position_ids_T()
    cache.start_prefill(seqs, positions_T, n_per_prompt)
    h_TD = model.hidden_states(input_ids_T, seqs, positions_T, cache=cache)
    logits_BV = model.lm_head(h_TD[seqs.cu_seqlens_B1[1:].long() - 1])
    cache.share_prefill()
    if n_per_prompt > 1:
        logits_BV = logits_BV.repeat_interleave(n_per_prompt, dim=0)
    use_graphs = gconfig.cuda_graphs and input_ids_T.device.type == "cuda"
    decoder = StaticDecoder(model, cache, gconfig, generator, stop_ids, use_graphs)
    with _graph_context(input_ids_T.device) if use_graphs else contextlib.nullcontext():
        decoder.run(logits_BV)
    return (
        decoder.tokens_NB.T,
        decoder.logp_NB.T,
        decoder.plain_NB.T,
        decoder.lens_B,
        decoder.stopped_B,
    )


@contextlib.contextmanager
def _graph_context(device: torch.device):
    """Where graphs are captured: on `device` (a graph captures on the current device's
    stream; a worker's model may be on cuda:i), under the caller's CUDA autocast (e.g. a train
    engine's bf16) with its weight-cast cache off (a graph captured with the cache on would
    read casts freed when that autocast region ends)."""
    with torch.cuda.device(device):
        if not torch.is_autocast_enabled("cuda"):
            yield
            return
        dtype = torch.get_autocast_dtype("cuda")
        with torch.autocast(device_type="cuda", dtype=dtype, cache_enabled=False):
            yield
