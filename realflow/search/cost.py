"""The cost model: time and memory of one model function call in one layout.

Every formula is a plain expression of the model shape (`ModelSpec`), the layout (dp, tp, pp),
the work (`Work`: sequences, prompt and answer lengths) and the device (`DeviceProfile`);
communication is bytes over a `Link` (bandwidth + latency). docs/search.md states them in words.

Conventions (what realflow runs, so what the model assumes):
- a batch of `n_seqs` sequences is split evenly over the dp ranks; every tp rank and stage of a
  replica sees the whole replica batch; sequences are packed, so a train / inference call
  processes `b * (prompt + answer)` tokens per replica;
- train_step and inference are micro-batched (`max_tokens_per_mb`, at least 2 * pp micro-batches
  with pp > 1) and pipelined 1F1B: a bubble of (m + pp - 1) / m. A train_step takes one
  optimizer step per minibatch (realflow.interfaces.common.train_minibatches: one
  `engine.train_batch` each), so its pipeline fills and drains once per minibatch, over that
  minibatch's micro-batches;
- tensor parallelism is Megatron's (realflow.parallel.tp): 2 all-reduces per block forward,
  2 per block backward (the recomputed forward of gradient checkpointing adds 2);
- generate runs the prefill like an inference call on the prompts, then one decode step per
  answer token; with pp > 1 the stages run one after another for every token (no
  micro-batching of the decode, as realflow.parallel.generate does), so pp does not speed a
  decode step up, it only spreads the weights;
- ring collectives: all-reduce moves 2 (n-1)/n of the bytes with 2 (n-1) latencies;
- a trained model keeps fp32 weights, fp32 gradients and Adam's two fp32 moments (16 bytes per
  weight, not sharded over dp); a copy for generation / inference holds `param_bytes` per weight.
"""

from __future__ import annotations

import dataclasses
import math

from realflow.parallel.layout import Layout
from realflow.search.spec import DeviceProfile, Link, ModelSpec

TRAIN_STATE_BYTES = 16.0  # fp32 weights + fp32 grads + Adam m, v
GRAD_BYTES = 4.0  # gradients are all-reduced in fp32 (the torch backend's master weights)
# Stored activations per token per layer per hidden unit (bf16, no sequence parallelism, flash
# attention): Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
# Models"), s b h (10 + 24 / t): the norms' and residual inputs (10) are whole on every tp rank,
# only the projections' and MLP's (24) are split.
ACT_BYTES_REPLICATED = 10.0
ACT_BYTES_SPLIT = 24.0
USABLE_MEMORY = 0.9  # fraction of a device's memory a plan may fill (allocator slack)


@dataclasses.dataclass(frozen=True)
class Work:
    """What one MFC processes per call: `n_seqs` sequences of `prompt_len` prompt tokens and
    `gen_len` answer tokens; a train step takes `n_minibatches` optimizer steps."""

    kind: str  # "generate" | "inference" | "train_step"
    n_seqs: int
    prompt_len: int
    gen_len: int
    max_tokens_per_mb: int = 4096
    n_minibatches: int = 1
    gradient_checkpointing: bool = False

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.gen_len


def allreduce_time(nbytes: float, n: int, link: Link, messages: int = 1) -> float:
    """Ring all-reduce of `nbytes` over `n` devices, sent as `messages` all-reduces."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.bandwidth + messages * 2 * (n - 1) * link.latency


def p2p_time(nbytes: float, link: Link) -> float:
    return nbytes / link.bandwidth + link.latency


@dataclasses.dataclass(frozen=True)
class Links:
    """The link each parallel axis of one mesh talks over."""

    tp: Link
    pp: Link
    dp: Link


def n_microbatches(work: Work, layout: Layout, b: int | None = None) -> int:
    """Micro-batches of `b` sequences (default: one replica's batch): enough to respect the
    token budget, >= 2 * pp with pp > 1, at most one per sequence."""
    if b is None:
        b = math.ceil(work.n_seqs / layout.dp)
    tokens = b * work.seq_len
    m = math.ceil(tokens / work.max_tokens_per_mb)
    if layout.pp > 1:
        m = max(m, 2 * layout.pp)
    return max(1, min(m, b))


def minibatch_seqs(work: Work, layout: Layout) -> int:
    """Sequences of one optimizer step on one replica: the replica's batch split into
    `n_minibatches` (the largest part)."""
    return math.ceil(math.ceil(work.n_seqs / layout.dp) / work.n_minibatches)


def stage_layers(model: ModelSpec, pp: int) -> int:
    """Blocks on the largest stage (earlier stages take the extra block)."""
    return math.ceil(model.n_layers / pp)


def device_params(model: ModelSpec, layout: Layout) -> float:
    """Weights on the fullest device: its stage's blocks / tp, plus the vocab embedding and
    head / tp on the stage(s) holding them."""
    vocab = model.embed_params / layout.tp
    ends = vocab * (1 if model.tie_word_embeddings else 2) if layout.pp == 1 else vocab
    return stage_layers(model, layout.pp) * model.layer_params / layout.tp + ends


def _forward_pass_time(
    model: ModelSpec,
    layout: Layout,
    tokens: float,
    ctx: float,
    m: int,
    passes: float,
    eff: float,
    dev: DeviceProfile,
    links: Links,
) -> float:
    """`passes` forward-equivalents (1: inference, 3: forward + backward, 4 with a recomputed
    forward) over `tokens` tokens of one replica in `m` micro-batches, pipelined over pp stages
    (one fill and drain), tp-sharded."""
    flops = passes * tokens * model.fwd_flops_per_token(ctx)
    stage_compute = flops / (layout.tp * layout.pp * dev.peak_flops * eff)
    layers = stage_layers(model, layout.pp)
    act_bytes = tokens * model.hidden_size * dev.param_bytes
    # two all-reduces per block forward (attention, MLP), two per block backward; the backward
    # is 2 forward-equivalents of FLOPs but one set of all-reduces
    n_ar = 2 * (passes - 1) if passes > 1 else 2
    tp_comm = layers * n_ar * allreduce_time(act_bytes, layout.tp, links.tp, messages=m)
    overhead = layers * m * passes * dev.layer_s
    per_stage = stage_compute + tp_comm + overhead
    bubble = (m + layout.pp - 1) / m
    pp_comm = 0.0
    if layout.pp > 1:  # each boundary: every micro-batch forward (and backward when training)
        per_mb = act_bytes / m / layout.tp
        pp_comm = (m + layout.pp - 1) * min(passes, 2) * p2p_time(per_mb, links.pp)
    return per_stage * bubble + pp_comm


def train_time(
    model: ModelSpec, layout: Layout, work: Work, dev: DeviceProfile, links: Links
) -> float:
    """One train_step call: per minibatch, forward + backward of its micro-batches through
    the pipeline, a gradient all-reduce over dp and an Adam step."""
    b = minibatch_seqs(work, layout)
    m = n_microbatches(work, layout, b)
    passes = 4.0 if work.gradient_checkpointing else 3.0
    fb = _forward_pass_time(
        model, layout, b * work.seq_len, work.seq_len / 2, m, passes, dev.train_eff, dev, links
    )
    p_dev = device_params(model, layout)
    grad_sync = allreduce_time(p_dev * GRAD_BYTES, layout.dp, links.dp)
    optim = p_dev * dev.optim_bytes_per_param / dev.mem_bandwidth
    return dev.call_s + work.n_minibatches * (fb + grad_sync + optim)


def inference_time(
    model: ModelSpec, layout: Layout, work: Work, dev: DeviceProfile, links: Links
) -> float:
    """One inference call: a forward pass over prompt + answer tokens."""
    b = math.ceil(work.n_seqs / layout.dp)
    m = n_microbatches(work, layout)
    fwd = _forward_pass_time(
        model, layout, b * work.seq_len, work.seq_len / 2, m, 1.0, dev.infer_eff, dev, links
    )
    return dev.call_s + fwd


def decode_step_time(
    model: ModelSpec, layout: Layout, b: int, ctx: float, dev: DeviceProfile, links: Links
) -> float:
    """One decode step of `b` sequences attending to `ctx` tokens: the larger of compute and
    reading the weights and KV cache (every stage in turn), plus per-step costs."""
    flops = b * model.fwd_flops_per_token(ctx)
    compute = flops / (layout.tp * dev.peak_flops * dev.infer_eff)
    kv_shard = min(layout.tp, model.n_kv_heads)
    weights = model.params * dev.param_bytes / layout.tp
    kv = b * ctx * 2 * model.n_layers * model.n_kv_heads * model.head_dim * dev.param_bytes
    memory = (weights + kv / kv_shard) / (dev.mem_bandwidth * dev.decode_bw_eff)
    msg = b * model.hidden_size * dev.param_bytes
    comm = 2 * model.n_layers * allreduce_time(msg, layout.tp, links.tp)
    comm += (layout.pp - 1) * p2p_time(msg, links.pp)
    overhead = dev.decode_step_s + model.n_layers * dev.layer_s
    return max(compute, memory) + comm + overhead


def generate_time(
    model: ModelSpec, layout: Layout, work: Work, dev: DeviceProfile, links: Links
) -> float:
    """One generate call: the prefill (an inference over the prompts), then `gen_len` decode
    steps of the replica's batch at the mean context length."""
    b = math.ceil(work.n_seqs / layout.dp)
    prefill_work = dataclasses.replace(work, gen_len=0)
    m = n_microbatches(prefill_work, layout)
    prefill = _forward_pass_time(
        model, layout, b * work.prompt_len, work.prompt_len / 2, m, 1.0, dev.infer_eff, dev,
        links,
    )  # fmt: skip
    ctx = work.prompt_len + work.gen_len / 2
    decode = work.gen_len * decode_step_time(model, layout, b, ctx, dev, links)
    return dev.call_s + prefill + decode


def mfc_time(
    model: ModelSpec, layout: Layout, work: Work, dev: DeviceProfile, links: Links
) -> float:
    """Seconds one call of `work.kind` takes: the model's work, then the runtime's share
    (`DeviceProfile.runtime`: scale and fixed cost per kind, measured from real runs)."""
    fn = {"generate": generate_time, "inference": inference_time, "train_step": train_time}
    if work.kind not in fn:
        raise ValueError(f"MFC kind {work.kind!r} is not one of {', '.join(fn)}")
    scale, call_s = dev.runtime_of(work.kind)
    return scale * fn[work.kind](model, layout, work, dev, links) + call_s


# ---- memory --------------------------------------------------------------------------------------


def weights_bytes(model: ModelSpec, layout: Layout, dev: DeviceProfile, trained: bool) -> float:
    """Bytes one device holds for a copy of the model: the training state (weights, grads,
    Adam) for the training copy, the weights in the compute dtype otherwise."""
    per = TRAIN_STATE_BYTES if trained else dev.param_bytes
    return device_params(model, layout) * per


def activation_bytes(model: ModelSpec, layout: Layout, work: Work, dev: DeviceProfile) -> float:
    """Working memory of one call on the fullest device: stored activations of the micro-batches
    in flight and the logits (train_step), one micro-batch's (inference), or the KV cache and
    one step's logits (generate)."""
    b = math.ceil(work.n_seqs / layout.dp)
    scale = dev.param_bytes / 2
    h, layers = model.hidden_size, stage_layers(model, layout.pp)
    logits_per_token = model.vocab_size / layout.tp * 4  # fp32 logits
    if work.kind == "generate":
        kv_heads = max(1, model.n_kv_heads // min(layout.tp, model.n_kv_heads))
        kv = b * work.seq_len * 2 * layers * kv_heads * model.head_dim * dev.param_bytes
        return kv + b * logits_per_token * 2
    if work.kind == "inference":
        t_mb = b * work.seq_len / n_microbatches(work, layout)
        return t_mb * (4 * h * dev.param_bytes + logits_per_token * 2)
    b = minibatch_seqs(work, layout)
    m = n_microbatches(work, layout, b)
    t_mb = b * work.seq_len / m
    if work.gradient_checkpointing:
        per_layer = 2 * h
    else:
        per_layer = (ACT_BYTES_REPLICATED + ACT_BYTES_SPLIT / layout.tp) * h
    in_flight = min(m, layout.pp)
    stored = in_flight * t_mb * layers * per_layer * scale
    return stored + t_mb * logits_per_token * 3


def fits(total_bytes: float, dev: DeviceProfile) -> bool:
    return total_bytes <= dev.memory * USABLE_MEMORY


def realloc_bytes(
    model: ModelSpec,
    src: Layout,
    src_workers: tuple[int, ...],
    dst: Layout,
    dst_workers: tuple[int, ...],
    param_bytes: float,
    sample: int = 0,
) -> dict[int, float]:
    """Bytes each destination device must receive from other devices to hold its shard of
    `dst`: its shard minus the part its own copy in `src` already holds (the fraction of its
    layer range and of its tp column range that the local source shard covers). `sample` > 0:
    only that many evenly spaced destination devices (the first and the last among them)."""
    from realflow.parallel.layout import Mesh

    src_mesh, dst_mesh = Mesh(src, src_workers), Mesh(dst, dst_workers)
    total = model.params * param_bytes
    out = {}
    chosen = dst_workers
    if 0 < sample < len(dst_workers):
        step = (len(dst_workers) - 1) / (sample - 1)
        chosen = tuple(dst_workers[round(i * step)] for i in range(sample))
    for w in chosen:
        c = dst_mesh.coords(w)
        need = total / (dst.tp * dst.pp)
        if w in src_mesh:
            s = src_mesh.coords(w)
            layers = _overlap(c.pp, dst.pp, s.pp, src.pp)
            cols = _overlap(c.tp, dst.tp, s.tp, src.tp)
            need *= 1.0 - layers * cols
        out[w] = need
    return out


def _overlap(i: int, n: int, j: int, k: int) -> float:
    """Fraction of the interval [i/n, (i+1)/n) covered by [j/k, (j+1)/k)."""
    lo, hi = max(i / n, j / k), min((i + 1) / n, (j + 1) / k)
    return max(0.0, hi - lo) * n
