"""Helpers every interface shares: micro-batching, packed forward passes, answer masks, answer
decoding, output samples and minibatch training.

Conventions (see the key table in realflow.api.data):

- `model.module` is an engine (realflow.engines): a `TrainEngine` for trained roles, an
  `InferenceEngine` otherwise (or a `BaseWeightsEngine`: another role's base weights). All
  have `.module` (the `PackedTransformer`), `.device`, `forward_no_grad(fn)` and
  `forward_generate(fn)` (generation: adapters merged); a `TrainEngine` also has `train_batch`.
- Per-token log-probs live in the shifted space (L-1 entries per sequence, "T1"); the answer mask
  in that space is True where the *predicted* token is an answer token.
- Outputs are returned on the device the input tensors were on.
- A model shard (realflow.parallel.runtime: the engine's `parallel` is set) runs the same code:
  log-probs are vocab-parallel (`module.vocab_shard`), micro-batches go through the pipeline
  (`forward_micro_batches`), generation spans the replica's workers and saving gathers the
  whole model on the mesh's first worker.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from realflow.algorithms import gather_packed_logprobs
from realflow.api.data import SequenceSample
from realflow.api.dfg import MicroBatchSpec
from realflow.api.interface import Model
from realflow.api.registry import closest

logger = logging.getLogger(__name__)

T = TypeVar("T")
IDS = "packed_input_ids"

# ---- arguments ----------------------------------------------------------------------------------


def build_args(cls: type, kwargs: dict[str, Any], interface: str) -> Any:
    """`cls(**kwargs)` for an interface's argument dataclass; unknown names are a ValueError that
    lists the known ones."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        hints = [
            f"'{u}'" + (f" (did you mean '{closest(u, known)}'?)" if closest(u, known) else "")
            for u in unknown
        ]
        raise ValueError(
            f"interface '{interface}': unknown arguments {', '.join(hints)}; known: {', '.join(known)}"
        )
    return cls(**kwargs)


# ---- engines and micro-batches -----------------------------------------------------------------


def engine_of(model: Model, interface: str) -> Any:
    """The engine of `model`, with a clear error for a weightless role."""
    if model.module is None:
        raise ValueError(
            f"interface '{interface}' needs model weights, but role '{model.name}' has none "
            "(head 'none'); give the role a model"
        )
    return model.module


def train_engine_of(model: Model, interface: str) -> Any:
    """The train engine of `model`; a role that is not trained is an error."""
    engine = engine_of(model, interface)
    if not hasattr(engine, "train_batch"):
        raise ValueError(
            f"interface '{interface}' train_step needs a trained role, but '{model.name}' has a "
            f"{type(engine).__name__}"
        )
    return engine


def split_micro_batches(data: SequenceSample, mb_spec: MicroBatchSpec) -> list[SequenceSample]:
    """Contiguous micro-batches within `mb_spec.max_tokens_per_mb`, at least `mb_spec.n_mbs`
    of them when there are enough samples."""
    if mb_spec.max_tokens_per_mb is None:
        mbs = [data]
    else:
        mbs = data.split_by_token_budget(mb_spec.max_tokens_per_mb)
    if len(mbs) < mb_spec.n_mbs <= data.bs:
        mbs = data.split(mb_spec.n_mbs)
    return mbs


def packed(
    mb: SequenceSample, device: torch.device, key: str = IDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids_T, cu_seqlens_B1)` of `key` on `device` (cu_seqlens int32)."""
    return mb.data[key].to(device), mb.cu_seqlens(key, device=device)


def map_micro_batches(
    model: Model,
    data: SequenceSample,
    mb_spec: MicroBatchSpec,
    fn: Callable[[torch.nn.Module, SequenceSample, torch.device], torch.Tensor],
    interface: str,
) -> torch.Tensor:
    """`fn(module, mb, device)` without grad on each micro-batch; outputs concatenated (dim 0)
    and moved to the device of the input tensors."""
    engine = engine_of(model, interface)
    out_device = next(iter(data.data.values())).device
    mbs = split_micro_batches(data, mb_spec)
    outs = forward_micro_batches(engine, mbs, lambda m, mb: fn(m, mb, engine.device))
    return torch.cat(outs).to(out_device)


def forward_micro_batches(
    engine: Any, mbs: list[SequenceSample], fn: Callable[[torch.nn.Module, SequenceSample], T]
) -> list[T]:
    """`[fn(module, mb) for mb in mbs]` without grad (`engine.forward_no_grad`). For a pipeline
    stage (pp > 1) the micro-batches go through the pipeline together and every stage gets the
    last stage's results."""
    parallel = getattr(engine, "parallel", None)
    if parallel is not None and parallel.pipelined:
        return engine.forward_no_grad(lambda _m: parallel.map_no_grad(mbs, fn))
    return [engine.forward_no_grad(lambda m, mb=mb: fn(m, mb)) for mb in mbs]


# ---- per-token quantities ----------------------------------------------------------------------


def token_logprobs(
    module: torch.nn.Module, mb: SequenceSample, device: torch.device, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs `logprobs_T1` (float32) of each next token of `packed_input_ids` under an LM
    (vocab-parallel on a tensor-parallel shard)."""
    ids_T, cu_B1 = packed(mb, device)
    logits_TV = module(ids_T, cu_B1)
    shard = vocab_shard(module)
    return gather_packed_logprobs(logits_TV, ids_T, cu_B1, temperature=temperature, shard=shard)


def vocab_shard(module: Any) -> Any:
    """The module's `VocabShard` when its logits hold one tp rank's vocab columns, else None."""
    return getattr(module, "vocab_shard", None)


def answer_mask_T1(prompt_mask_T: torch.Tensor, cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
    """Bool `loss_mask_T1`: True at T1-position t of a sequence when token t+1 is an answer token
    (`prompt_mask` False). Drops the first token of every sequence."""
    keep = torch.ones(prompt_mask_T.shape[0], dtype=torch.bool, device=prompt_mask_T.device)
    keep[cu_seqlens_B1[:-1].long()] = False
    return ~prompt_mask_T.bool()[keep]


def loss_scale_T1(mb: SequenceSample, device: torch.device) -> torch.Tensor:
    """Float32 weight of every predicted token (T1): the sample's `loss_scale` (L per sequence,
    the weight of predicting that token) when it has one, else 1 on answer tokens
    (`prompt_mask` False) and 0 on the prompt."""
    cu_B1 = mb.cu_seqlens(IDS, device=device)
    if "loss_scale" not in mb.data:
        return answer_mask_T1(mb.data["prompt_mask"].to(device), cu_B1).float()
    scale_T = mb.data["loss_scale"].to(device).float()
    keep = torch.ones(scale_T.shape[0], dtype=torch.bool, device=device)
    keep[cu_B1[:-1].long()] = False
    return scale_T[keep]


def shifted_seqlens(data: SequenceSample, key: str = IDS) -> list[list[int]]:
    """Per sample, L-1 for each sequence of `key` (the layout of logprobs)."""
    return [[n - 1 for n in lens] for lens in data.seqlens[key]]


def one_per_seq(data: SequenceSample, key: str = IDS) -> list[list[int]]:
    """Per sample, a 1 for each sequence of `key` (the layout of rewards, no_eos_mask...)."""
    return [[1] * len(lens) for lens in data.seqlens[key]]


def output_sample(
    data: SequenceSample,
    tensors: dict[str, torch.Tensor],
    seqlens: dict[str, list[list[int]]],
    metadata: dict[str, list[Any]] | None = None,
) -> SequenceSample:
    """A SequenceSample with the ids of `data` holding `tensors` laid out as `seqlens`."""
    return SequenceSample(
        ids=list(data.ids),
        seqlens=seqlens,
        data=tensors,
        metadata=dict(data.metadata if metadata is None else metadata),
    )


def with_keys(
    data: SequenceSample, tensors: dict[str, torch.Tensor], seqlens: dict[str, list[list[int]]]
) -> SequenceSample:
    """A copy of `data` (same tensors) with more keys added."""
    out = data.select(data.keys)
    out.update_(output_sample(data, tensors, seqlens))
    return out


def per_sequence_metadata(data: SequenceSample, key: str = IDS) -> list[dict[str, Any]]:
    """One metadata dict per sequence of `key`: a sample's metadata apply to all its sequences."""
    out = []
    for i, lens in enumerate(data.seqlens[key]):
        row = {k: v[i] for k, v in data.metadata.items()}
        out.extend(dict(row) for _ in lens)
    return out


# ---- text ---------------------------------------------------------------------------------------


def split_prompt_answer(
    ids_T: torch.Tensor, prompt_mask_T: torch.Tensor, cu_seqlens_B1: torch.Tensor, eos_ids: set[int]
) -> tuple[list[list[int]], list[list[int]]]:
    """Per sequence, the prompt tokens and the answer tokens with trailing EOS tokens removed."""
    prompts, answers = [], []
    cu = cu_seqlens_B1.tolist()
    ids, mask = ids_T.tolist(), prompt_mask_T.bool().tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        prompts.append([t for t, m in zip(ids[a:b], mask[a:b]) if m])
        answer = [t for t, m in zip(ids[a:b], mask[a:b]) if not m]
        while answer and answer[-1] in eos_ids:
            answer.pop()
        answers.append(answer)
    return prompts, answers


def decode_prompts_answers(
    tokenizer: Any, data: SequenceSample
) -> tuple[list[str], list[str], list[list[int]]]:
    """Texts of the prompts and answers of every sequence of `packed_input_ids` (special tokens
    skipped, EOS stripped), and the answers' token ids."""
    if tokenizer is None:
        raise ValueError("decoding answers needs the role's tokenizer, but the model has none")
    eos = tokenizer.eos_token_id
    eos_ids = set() if eos is None else {int(eos)}
    prompt_ids, answer_ids = split_prompt_answer(
        data.data[IDS], data.data["prompt_mask"], data.cu_seqlens(IDS), eos_ids
    )
    prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    answers = tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    return prompts, answers, answer_ids


# ---- training ----------------------------------------------------------------------------------


def mean_stats(all_stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over the dicts that report the key."""
    sums: dict[str, list[float]] = {}
    for stats in all_stats:
        for k, v in stats.items():
            sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def train_minibatches(
    engine: Any,
    data: SequenceSample,
    n_minibatches: int,
    mb_spec: MicroBatchSpec,
    loss_fn: Callable[[torch.nn.Module, SequenceSample], tuple[torch.Tensor, dict[str, float]]],
    loss_weight_fn: Callable[[SequenceSample], float],
    skip_fn: Callable[[SequenceSample], bool] | None = None,
) -> dict[str, float]:
    """One optimizer step per minibatch (`data.split(n_minibatches)`), each accumulated over
    token-budget micro-batches. `skip_fn(minibatch)` True skips that minibatch (early stop).
    Returns the engine stats averaged over the minibatches that ran, and `n_skipped_minibatches`."""
    if data.bs < n_minibatches:
        raise ValueError(f"n_minibatches ({n_minibatches}) must be <= batch size ({data.bs})")
    ran, skipped = [], 0
    for minibatch in data.split(n_minibatches):
        if skip_fn is not None and skip_fn(minibatch):
            skipped += 1
            continue
        mbs = split_micro_batches(minibatch, mb_spec)
        if sum(loss_weight_fn(mb) for mb in mbs) <= 0:
            logger.warning("minibatch with no answer tokens skipped (ids %s)", minibatch.ids)
            skipped += 1
            continue
        ran.append(engine.train_batch(mbs, loss_fn, loss_weight_fn))
    if skipped:
        logger.info("skipped %d of %d minibatches", skipped, n_minibatches)
    return {**mean_stats(ran), "n_skipped_minibatches": float(skipped)}


def evaluate_loss(
    model: Model,
    data: SequenceSample,
    mb_spec: MicroBatchSpec,
    loss_fn: Callable[[torch.nn.Module, SequenceSample], tuple[torch.Tensor, dict[str, float]]],
    loss_weight_fn: Callable[[SequenceSample], float],
    interface: str,
) -> dict[str, float]:
    """A training loss and its stats under the current weights, without a gradient: the same
    micro-batch weighting as training, so the result is the mean over the whole batch. `weight`
    is that batch's total weight (the evaluation averages batches with it)."""
    engine = engine_of(model, interface)
    mbs = split_micro_batches(data, mb_spec)
    weights = [float(loss_weight_fn(mb)) for mb in mbs]
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"{interface} evaluate: the batch (ids {data.ids}) has nothing to score")
    out: dict[str, float] = {}
    for (loss, stats), w in zip(forward_micro_batches(engine, mbs, loss_fn), weights):
        for k, v in {"loss": float(loss), **stats}.items():
            out[k] = out.get(k, 0.0) + w / total * float(v)
    return {**out, "weight": total}


def save_hf_dir(model: Model, save_dir: str) -> None:
    """Write the trained role's full weights, in the engine's save dtype, (and tokenizer) as an
    HF directory; a role with adapters writes an HF peft adapter directory instead (and the
    merged model under `merged/` with `<role>.save_merged`).

    A model in a mesh (the engine's `parallel` set): every worker of the mesh calls this; the
    mesh's first worker gathers the whole model (from the shards) and alone writes it."""
    from realflow.models.hf_io import save_hf

    engine = train_engine_of(model, "save")
    parallel = getattr(engine, "parallel", None)
    if parallel is not None:
        first = parallel.groups.mesh.workers[0]
        full = parallel.gather_full_model(first) if parallel.sharded else engine.module
        if parallel.groups.rank == first:
            save_hf(
                full, save_dir, model.tokenizer, engine.save_dtype, state_dict=full.state_dict()
            )
        return
    if hasattr(engine.module, "peft_config"):  # adapters: realflow.engines.tuners.has_adapters
        from realflow.engines.tuners import save_adapters

        save_adapters(engine, save_dir, model.tokenizer)
        return
    weights = engine.module_state_dict()
    save_hf(engine.module, save_dir, model.tokenizer, engine.save_dtype, state_dict=weights)


# ---- generation ---------------------------------------------------------------------------------


def stop_token_ids(model: Model) -> list[int]:
    """EOS ids of the role: the model config's and the tokenizer's."""
    ids = set(engine_of(model, "generate").module.config.eos_token_ids)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    return sorted(ids)


def rollout(
    model: Model,
    data: SequenceSample,
    mb_spec: MicroBatchSpec,
    gconfig: Any,
    n_per_prompt: int,
    temperature: float,
) -> SequenceSample:
    """Generate `n_per_prompt` answers for every prompt of `packed_prompts`.

    Sample i of the result holds the answers to its prompts (n_per_prompt per prompt, in order)
    under packed_input_ids (prompt + answer), prompt_mask, logprobs (L-1: 0 on prompt positions,
    then the log-prob of each answer token under `log_softmax(logits / temperature)`, whatever
    top-k / top-p / min_new_tokens did to the sampling distribution: generation records them in
    the same decode step, so they equal a forward pass over the answers) and no_eos_mask (1 per
    sequence). Metadata are kept. `temperature` must be the generation's (1 when greedy).
    """
    from realflow.models.generation import generate, plain_temperature

    if temperature != plain_temperature(gconfig):
        raise ValueError(
            f"rollout log-prob temperature ({temperature}) must be the generation's "
            f"({plain_temperature(gconfig)}: 1 when greedy)"
        )
    engine = engine_of(model, "generate")
    parallel = getattr(engine, "parallel", None)
    # A shard generates with the replica's workers (realflow.parallel.generate): same call.
    gen = parallel.generate if parallel is not None and parallel.sharded else generate
    gconfig = dataclasses.replace(gconfig, eos_token_ids=stop_token_ids(model))
    seqs: dict[str, list[list[torch.Tensor]]] = {
        k: [] for k in (IDS, "prompt_mask", "logprobs", "no_eos_mask")
    }
    for mb in split_micro_batches(data, mb_spec):
        unique = mb.data["packed_prompts"].split(mb.flat_seqlens("packed_prompts"))
        prompts = [p for p in unique for _ in range(n_per_prompt)]
        ids_T = mb.data["packed_prompts"].to(engine.device)
        cu_B1 = cu_seqlens_from(unique, engine.device)
        out = engine.forward_generate(
            lambda module, i=ids_T, c=cu_B1: gen(module, i, c, gconfig, model.rng, n_per_prompt)
        )
        answers = out.output_ids_T.split(out.output_lens_B.tolist())
        logps = out.plain_logprobs_T.split(out.output_lens_B.tolist())
        per_sample = [len(lens) * n_per_prompt for lens in mb.seqlens["packed_prompts"]]
        start = 0
        for n in per_sample:
            rows = range(start, start + n)
            start += n
            seqs[IDS].append(
                [torch.cat([prompts[j], answers[j].to(prompts[j].device)]) for j in rows]
            )
            seqs["prompt_mask"].append(
                [_prompt_mask(len(prompts[j]), len(answers[j])) for j in rows]
            )
            seqs["logprobs"].append([_pad_prompt(len(prompts[j]), logps[j]) for j in rows])
            seqs["no_eos_mask"].append([out.no_eos_mask_B[j : j + 1].cpu() for j in rows])
    out_device = data.data["packed_prompts"].device
    result = SequenceSample.from_sequences(data.ids, seqs, metadata=dict(data.metadata))
    result.data = {k: v.to(out_device) for k, v in result.data.items()}
    return result


def cu_seqlens_from(seqs: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32, device=device)
    return torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))


def _prompt_mask(n_prompt: int, n_answer: int) -> torch.Tensor:
    return torch.cat(
        [torch.ones(n_prompt, dtype=torch.bool), torch.zeros(n_answer, dtype=torch.bool)]
    )


def _pad_prompt(n_prompt: int, answer_logprobs: torch.Tensor) -> torch.Tensor:
    lp = answer_logprobs.float().cpu()
    return torch.cat([torch.zeros(n_prompt - 1, dtype=torch.float32), lp])
