"""Generation over a packed batch of prompts with a per-sequence KV cache.

    out = generate(model, prompt_ids_T, prompt_cu_seqlens_B1, GenerationConfig(max_new_tokens=64),
                   generator=torch.Generator().manual_seed(0))
    out.output_ids_T, out.output_cu_seqlens_B1, out.logprobs_T, out.no_eos_mask_B

The prompts run as one packed prefill (no padding). Two decode engines (`GenerationConfig.engine`):
- `eager`: each decode step batches the still-active sequences only: a sequence that emits EOS /
  a stop token (or reaches max_new_tokens) leaves the batch and its cache row is dropped (a copy).
  Tensor / pipeline-parallel generation always runs this one.
- `static` (realflow.models.static_decode): fixed-shape buffers, the batch stays dense (finished
  rows keep running, masked), no host sync per token, and on CUDA the decode step is a CUDA graph.
`auto` is `static` on CUDA and `eager` elsewhere. Both draw the same uniforms per step for every
sequence of the batch, so under one seed they give the same tokens (up to float rounding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from realflow.models.attention import PackedSeqs
from realflow.models.kv_cache import KVCache
from realflow.models.transformer import PackedTransformer, check_packed

logger = logging.getLogger(__name__)

DECODE_ENGINES = ("auto", "eager", "static")


@dataclass
class GenerationConfig:
    """How to pick new tokens and when to stop.

    `greedy` ignores temperature/top_k/top_p. `top_k=0` and `top_p=1.0` disable those filters.
    Ties are kept together: every token tied at the k-th logit, and every token tied with the
    least probable one top_p keeps (see `process_logits`).
    A sequence stops at any of `eos_token_ids` (None: the model config's eos_token_id) or
    `stop_token_ids` once it has `min_new_tokens`, and always at `max_new_tokens`.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: list[int] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    # How decoding runs (see the module docstring): "auto" | "eager" | "static"; cuda_graphs
    # False runs the static engine's step without capturing it (debugging, comparisons).
    engine: str = "auto"
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        errors = []
        if self.engine not in DECODE_ENGINES:
            errors.append(f"engine ({self.engine!r}) must be one of {DECODE_ENGINES}")
        if self.max_new_tokens < 1:
            errors.append(f"max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            errors.append(
                f"min_new_tokens ({self.min_new_tokens}) must be in [0, max_new_tokens ({self.max_new_tokens})]"
            )
        if self.temperature <= 0:
            errors.append(f"temperature ({self.temperature}) must be > 0 (use greedy=True)")
        if self.top_k < 0:
            errors.append(f"top_k ({self.top_k}) must be >= 0")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p ({self.top_p}) must be in (0, 1]")
        if errors:
            raise ValueError("invalid GenerationConfig: " + "; ".join(errors))


@dataclass
class GenerationOutput:
    """Generated tokens of B sequences, packed.

    - `output_ids_T`: new tokens (EOS / stop token included), sequences concatenated.
    - `output_cu_seqlens_B1` (int32, B+1) and `output_lens_B`: where each sequence's tokens are.
    - `logprobs_T` (float32): log-probability of each token under the distribution it was drawn
      from (after temperature / top-k / top-p / the min_new_tokens stop mask; the plain softmax
      when greedy).
    - `plain_logprobs_T` (float32): log-probability of each token under the unfiltered
      `log_softmax(logits / temperature)` (temperature 1 when greedy), the one a forward pass
      over the finished sequence gives (what PPO / GRPO train on). Equal to `logprobs_T` when
      no filter applies; computed in the same decode step, never by a second pass.
    - `no_eos_mask_B` (bool): True where the sequence stopped at max_new_tokens without EOS or a
      stop token.
    """

    output_ids_T: torch.Tensor
    output_cu_seqlens_B1: torch.Tensor
    output_lens_B: torch.Tensor
    logprobs_T: torch.Tensor
    no_eos_mask_B: torch.Tensor
    plain_logprobs_T: torch.Tensor

    def with_prompts(self, prompt_ids_T: torch.Tensor, prompt_cu_seqlens_B1: torch.Tensor):
        """(ids_T, cu_seqlens_B1, prompt_mask_T): prompts and answers packed per sequence (the
        prompts given to `generate`; each one's n_per_prompt answers follow one another)."""
        ids, mask, lens = [], [], []
        n_per_prompt = self.output_lens_B.numel() // (prompt_cu_seqlens_B1.numel() - 1)
        for b in range(self.output_lens_B.numel()):
            i = b // n_per_prompt
            p = prompt_ids_T[prompt_cu_seqlens_B1[i] : prompt_cu_seqlens_B1[i + 1]]
            a = self.output_ids_T[self.output_cu_seqlens_B1[b] : self.output_cu_seqlens_B1[b + 1]]
            ids += [p, a.to(p.device)]
            mask += [torch.ones_like(p, dtype=torch.bool), torch.zeros_like(a, dtype=torch.bool)]
            lens.append(p.numel() + a.numel())
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lens).cumsum(0)
        return torch.cat(ids), cu, torch.cat(mask).to(prompt_ids_T.device)


def process_logits(logits_BV: torch.Tensor, gconfig: GenerationConfig) -> torch.Tensor:
    """Logits of the distribution to sample from (fp32; filtered tokens get -inf).

    Greedy: the logits as they are. Otherwise, in this order (as transformers' warpers):
    divide by `temperature`; `top_k` keeps every token whose logit is >= the k-th largest (ties
    at the k-th value are all kept); `top_p` keeps the smallest set of most probable tokens
    whose probability (after top-k) reaches `top_p`, plus every token tied with the least
    probable of them: a token is kept when the mass of strictly more probable tokens is
    < top_p. So equal logits are always treated alike, and the argmax is always kept.
    """
    logits = logits_BV.float()
    if gconfig.greedy:
        return logits
    if gconfig.temperature != 1.0:
        logits = logits / gconfig.temperature
    if 0 < gconfig.top_k < logits.shape[-1]:
        kth = torch.topk(logits, gconfig.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gconfig.top_p < 1.0:
        sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Mass of the tokens sorted before each one: non-decreasing, so the kept ones are a prefix.
        mass_before = torch.nn.functional.pad(probs.cumsum(-1)[:, :-1], (1, 0))
        n_keep = (mass_before < gconfig.top_p).sum(-1, keepdim=True)  # >= 1: mass_before[0] = 0
        cutoff = sorted_logits.gather(-1, n_keep - 1)
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return logits


def uniform_draws(n_rows: int, device: torch.device, generator: torch.Generator | None):
    """One U[0, 1) draw `u_B` (fp64) per row for `sample_tokens`."""
    return torch.rand(n_rows, dtype=torch.float64, device=device, generator=generator)


def sample_tokens(
    logits_BV: torch.Tensor,
    gconfig: GenerationConfig,
    generator: torch.Generator | None,
    u_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_B, logprobs_B) drawn from `process_logits(logits_BV)`.

    A draw inverts the cumulative distribution at one uniform `u_B` per row (default: drawn
    from `generator`): the first token whose fp64 cumulative probability exceeds `u * total`,
    found by binary search. One uniform per row instead of one noise value per token (the
    exponential race draws rows x vocab, which on CPU cost more than the rest of a decode step
    of a small model), and no host sync. Filtered tokens (p = 0) are never drawn."""
    logp_BV = torch.log_softmax(process_logits(logits_BV, gconfig), dim=-1)
    if gconfig.greedy:
        tokens_B = logp_BV.argmax(-1)
    else:
        if u_B is None:
            u_B = uniform_draws(logp_BV.shape[0], logp_BV.device, generator)
        cdf_BV = logp_BV.double().exp_().cumsum_(-1)
        x_B1 = (u_B * cdf_BV[:, -1])[:, None]
        tokens_B = torch.searchsorted(cdf_BV, x_B1, right=True).squeeze(-1)
        tokens_B = tokens_B.clamp_max_(logp_BV.shape[-1] - 1)
        # u * total rounds below total, so the token found has p > 0; this only guards the
        # last token of a row against a rounding up (its p would be 0 if it was filtered).
        drawn_lp_B = logp_BV.gather(-1, tokens_B[:, None]).squeeze(-1)
        tokens_B = torch.where(drawn_lp_B > float("-inf"), tokens_B, logp_BV.argmax(-1))
    return tokens_B, logp_BV.gather(-1, tokens_B[:, None]).squeeze(-1)


def plain_temperature(gconfig: GenerationConfig) -> float:
    """The temperature of the unfiltered distribution (1 when greedy)."""
    return 1.0 if gconfig.greedy else gconfig.temperature


def plain_logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor, temperature: float):
    """`log_softmax(logits / temperature)` at `tokens_B` (fp32), computed as
    `realflow.algorithms.gather_packed_logprobs` does."""
    x = logits_BV.float()
    if temperature != 1.0:
        x = x / temperature
    return x.gather(-1, tokens_B[:, None]).squeeze(-1) - torch.logsumexp(x, dim=-1)


class DecodeStep(Protocol):
    """How one forward + sampling step runs: on one device (`LocalDecodeStep`) or across
    tensor / pipeline-parallel ranks (realflow.parallel.generate)."""

    def logits(
        self,
        ids_T: torch.Tensor,
        seqs: PackedSeqs,
        position_ids_T: torch.Tensor,
        cache: KVCache,
        rows: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Next-token logits `logits_BV` of `rows` of the hidden states (all rows when None);
        None on a rank that does not sample."""
        ...

    def pick(
        self,
        logits_BV: torch.Tensor | None,
        step: int,
        stop_ids: torch.Tensor,
        rows_B: torch.Tensor,
        n_total: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens_B, logprobs_B, plain_logprobs_B) of new step `step` for the active rows
        `rows_B` (their indices among the `n_total` sequences), the same on every rank (see
        `pick_tokens`)."""
        ...


class LocalDecodeStep:
    """The whole model on one device."""

    def __init__(
        self,
        model: PackedTransformer,
        gconfig: GenerationConfig,
        generator: torch.Generator | None,
    ):
        self.model, self.gconfig, self.generator = model, gconfig, generator

    def logits(self, ids_T, seqs, position_ids_T, cache, rows):
        h = self.model.hidden_states(ids_T, seqs, position_ids_T, cache=cache)
        return self.model.lm_head(h if rows is None else h[rows])

    def pick(self, logits_BV, step, stop_ids, rows_B, n_total):
        return pick_tokens(
            logits_BV, step, stop_ids, self.gconfig, self.generator, rows_B=rows_B, n_total=n_total
        )


def pick_tokens(
    logits_BV: torch.Tensor,
    step: int,
    stop_ids: torch.Tensor,
    gconfig: GenerationConfig,
    generator: torch.Generator | None,
    rows_B: torch.Tensor | None = None,
    n_total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample_tokens`, with stop tokens banned before `min_new_tokens`; also returns the
    tokens' log-probs under the unfiltered distribution (`plain_logprobs`).

    With `rows_B` (the active rows' indices among `n_total` sequences) the uniforms are drawn
    for all `n_total` and each row takes its own, so a sequence's draws do not depend on which
    others have finished (the eager and static engines then agree under one seed)."""
    draw_BV = logits_BV
    if step < gconfig.min_new_tokens and stop_ids.numel():
        draw_BV = logits_BV.float().index_fill(-1, stop_ids, float("-inf"))
    u_B = None
    if rows_B is not None and not gconfig.greedy:
        u_B = uniform_draws(n_total, logits_BV.device, generator)[rows_B]
    tok_B, logp_B = sample_tokens(draw_BV, gconfig, generator, u_B)
    return tok_B, logp_B, plain_logprobs(logits_BV, tok_B, plain_temperature(gconfig))


@torch.no_grad()
def generate(
    model: PackedTransformer,
    input_ids_T: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    gconfig: GenerationConfig,
    generator: torch.Generator | None = None,
    n_per_prompt: int = 1,
    step: DecodeStep | None = None,
) -> GenerationOutput:
    """Continue every packed prompt `n_per_prompt` times (outputs in order: prompt 0's answers,
    then prompt 1's...); see the module docstring. Deterministic under `generator`.

    A prompt's answers share one prefill: its keys/values are computed once and copied to each
    answer's cache row, which gives the same numbers as prefilling every copy. `step` runs the
    forward and sampling (default: `LocalDecodeStep`, the whole model here);
    realflow.parallel.generate passes one that spans tensor / pipeline-parallel ranks."""
    if model.head != "lm":
        raise ValueError(f"generate needs a model with head 'lm', got {model.head!r}")
    if n_per_prompt < 1:
        raise ValueError(f"n_per_prompt ({n_per_prompt}) must be >= 1")
    if step is None and model.shard is not None:
        raise ValueError(
            f"this model is one shard ({model.shard}) of a parallel layout: generate with "
            "realflow.parallel.generate.parallel_generate"
        )
    cfg = model.config
    seqs = check_packed(input_ids_T, cu_seqlens_B1, cfg)
    max_len = seqs.max_seqlen + gconfig.max_new_tokens
    if cfg.position == "learned" and max_len > cfg.max_position_embeddings:
        raise ValueError(
            f"longest prompt ({seqs.max_seqlen}) + max_new_tokens ({gconfig.max_new_tokens}) exceeds "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    eos = cfg.eos_token_ids if gconfig.eos_token_ids is None else list(gconfig.eos_token_ids)
    device = input_ids_T.device
    stop_ids = torch.tensor(
        sorted(set(eos) | set(gconfig.stop_token_ids)), device=device, dtype=torch.long
    )
    b = len(seqs.seqlens) * n_per_prompt
    n_layers, n_kv, head_dim = model.kv_cache_dims()
    cache = KVCache(n_layers, b, n_kv, head_dim, max_len, _cache_dtype(model), device)
    static = step is None and resolve_engine(gconfig.engine, device) == "static"
    graphs = static and gconfig.cuda_graphs and device.type == "cuda"
    step = LocalDecodeStep(model, gconfig, generator) if step is None else step
    was_training = model.training
    model.eval()
    try:
        # Autocast's weight-cast cache must be off while a CUDA graph is captured.
        with model.autocast(cache_enabled=not graphs):
            if static:
                from realflow.models.static_decode import static_decode_loop

                loop_out = static_decode_loop(
                    model, input_ids_T, seqs, cache, gconfig, generator, stop_ids, n_per_prompt
                )
            else:
                loop_out = _decode_loop(
                    step, input_ids_T, seqs, cache, gconfig, stop_ids, n_per_prompt
                )
    finally:
        model.train(was_training)
    tokens_BN, logprobs_BN, plain_BN, lens_B, stopped_B = loop_out
    keep_BN = torch.arange(gconfig.max_new_tokens, device=device)[None, :] < lens_B[:, None]
    cu = torch.zeros(b + 1, dtype=torch.int32, device=device)
    cu[1:] = lens_B.cumsum(0)
    return GenerationOutput(
        output_ids_T=tokens_BN[keep_BN],
        output_cu_seqlens_B1=cu,
        output_lens_B=lens_B,
        logprobs_T=logprobs_BN[keep_BN],
        no_eos_mask_B=~stopped_B,
        plain_logprobs_T=plain_BN[keep_BN],
    )


def resolve_engine(engine: str, device: torch.device) -> str:
    """The decode engine to run: `auto` is `static` on CUDA, `eager` elsewhere."""
    if engine == "auto":
        return "static" if device.type == "cuda" else "eager"
    return engine


def _cache_dtype(model: PackedTransformer) -> torch.dtype:
    """The dtype keys/values are computed in: the model's autocast, else the caller's (a train
    engine's bf16 over fp32 weights: an fp32 cache would be cast back for every decode
    attention), else the weights'."""
    if model.config.autocast_dtype is not None:
        return getattr(torch, model.config.autocast_dtype)
    device_type = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return next(model.parameters()).dtype


def _decode_loop(step: DecodeStep, input_ids_T, seqs, cache, gconfig, stop_ids, n_per_prompt):
    """Prefill, then one batched step per new token over the active rows only.

    Returns tokens_BN, logprobs_BN, plain_logprobs_BN (N = max_new_tokens, valid up to lens_B),
    lens_B, stopped_B.
    """
    device = input_ids_T.device
    b, n_new = len(seqs.seqlens) * n_per_prompt, gconfig.max_new_tokens
    tokens_BN = torch.zeros(b, n_new, dtype=torch.long, device=device)
    logprobs_BN = torch.zeros(b, n_new, dtype=torch.float32, device=device)
    plain_BN = logprobs_BN.clone()
    lens_B = torch.zeros(b, dtype=torch.long, device=device)
    stopped_B = torch.zeros(b, dtype=torch.bool, device=device)

    positions_T = seqs.position_ids_T()
    cache.start_prefill(seqs, positions_T, n_per_prompt)
    logits_BV = step.logits(
        input_ids_T, seqs, positions_T, cache, seqs.cu_seqlens_B1[1:].long() - 1
    )
    cache.share_prefill()
    if n_per_prompt > 1 and logits_BV is not None:
        logits_BV = logits_BV.repeat_interleave(n_per_prompt, dim=0)
    active_B = torch.arange(b, device=device)  # original index of each active row
    step_seqs = PackedSeqs(torch.arange(b + 1, dtype=torch.int32, device=device), [1] * b, 1)
    for i in range(n_new):
        tok_B, logp_B, plain_B = step.pick(logits_BV, i, stop_ids, active_B, b)
        tokens_BN[active_B, i] = tok_B
        logprobs_BN[active_B, i] = logp_B
        plain_BN[active_B, i] = plain_B
        lens_B[active_B] += 1
        is_stop_B = torch.isin(tok_B, stop_ids)
        stopped_B[active_B] = is_stop_B
        if i + 1 == n_new:
            break
        if bool(is_stop_B.any()):
            keep = (~is_stop_B).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            active_B, tok_B = active_B[keep], tok_B[keep]
            cache.keep(keep)
        n_act = active_B.numel()
        if n_act != len(step_seqs.seqlens):
            step_seqs = PackedSeqs(step_seqs.cu_seqlens_B1[: n_act + 1], [1] * n_act, 1)
        positions_B = cache.start_decode_step()
        logits_BV = step.logits(tok_B, step_seqs, positions_B, cache, None)
        cache.end_decode_step()
    return tokens_BN, logprobs_BN, plain_BN, lens_B, stopped_B
