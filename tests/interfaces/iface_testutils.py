"""Helpers of the interface tests: tiny models (tiny-llama: 2 layers, hidden 64), the built-in tokenizer, batches from the
built-in datasets and hand-built RL batches."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from realflow.api.data import SequenceSample  # noqa: E402
from realflow.api.dfg import MicroBatchSpec  # noqa: E402
from realflow.api.interface import Model  # noqa: E402
from realflow.engines import (  # noqa: E402
    EngineConfig,
    InferenceEngine,
    OptimizerConfig,
    build_train_engine,
)
from realflow.interfaces.common import answer_mask_T1  # noqa: E402


def make_module(tokenizer, head: str = "lm", seed: int = 0) -> torch.nn.Module:
    from realflow.models.builtin import builtin_config
    from realflow.models.transformer import PackedTransformer

    torch.manual_seed(seed)
    cfg = builtin_config(
        "tiny-llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id
    )
    return PackedTransformer(cfg, head=head)


def train_model(
    tokenizer,
    head: str = "lm",
    seed: int = 0,
    lr: float = 1e-3,
    name: str = "actor",
    optim: OptimizerConfig | None = None,
):
    if optim is None:
        optim = OptimizerConfig(lr=lr, lr_scheduler_type="constant", warmup_steps_proportion=0.0)
    engine = build_train_engine(make_module(tokenizer, head, seed), EngineConfig(), optim, 100)
    return Model(name, engine, tokenizer)


def inference_model(tokenizer, head: str = "lm", seed: int = 0, name: str = "ref"):
    return Model(
        name, InferenceEngine(make_module(tokenizer, head, seed), EngineConfig()), tokenizer
    )


def dataset_batch(kind: str, tokenizer, n: int, task: str = "reverse") -> SequenceSample:
    """The first `n` rows of a built-in dataset as one batch."""
    from realflow.data import PairedDataset, PromptAnswerDataset, PromptDataset

    cls = {"prompt": PromptDataset, "sft": PromptAnswerDataset, "paired": PairedDataset}[kind]
    ds = cls(f"builtin:{task}", tokenizer, n_rows=n)
    return SequenceSample.gather([ds[i] for i in range(n)])


def copy_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


MB = MicroBatchSpec(max_tokens_per_mb=64)
NO_LIMIT = MicroBatchSpec()


# ---- hand-built batches ---------------------------------------------------------------------


def random_sequences(n: int, seed: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n (ids, prompt_mask) sequences: prompts of 2..5 tokens, answers of 1..12 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_prompt = int(torch.randint(2, 6, (), generator=g))
        n_answer = int(torch.randint(1, 13, (), generator=g))
        ids = torch.randint(3, vocab, (n_prompt + n_answer,), generator=g)
        mask = torch.tensor([True] * n_prompt + [False] * n_answer)
        out.append((ids, mask))
    return out


def grouped_batch(tokenizer, group_sizes: list[int], seed: int = 0) -> SequenceSample:
    """Samples holding `group_sizes[i]` sequences each (packed_input_ids, prompt_mask)."""
    seqs = random_sequences(sum(group_sizes), seed, len(tokenizer))
    ids, masks, start = [], [], 0
    for n in group_sizes:
        ids.append([s for s, _ in seqs[start : start + n]])
        masks.append([m for _, m in seqs[start : start + n]])
        start += n
    keys = {"packed_input_ids": ids, "prompt_mask": masks}
    return SequenceSample.from_sequences(list(range(len(group_sizes))), keys)


def per_sequence(data: SequenceSample, values: list[float]) -> SequenceSample:
    """One value per sequence of packed_input_ids, under `rewards`."""
    it = iter(values)
    rows = [[torch.tensor([next(it)]) for _ in lens] for lens in data.seqlens["packed_input_ids"]]
    return SequenceSample.from_sequences(data.ids, {"rewards": rows})


def rl_batch(tokenizer, group_sizes, iface, seed):
    """A train batch of ppo/grpo: sequences with the actor's own log-probs (0 on the prompt, as
    a rollout stores them), a reference's log-probs, a critic's values and random rewards."""
    data = grouped_batch(tokenizer, group_sizes, seed)
    ids = data.select(["packed_input_ids"])
    logp = iface.inference(inference_model(tokenizer, seed=0), ids, NO_LIMIT)
    mask_T1 = answer_mask_T1(data.data["prompt_mask"], data.cu_seqlens("packed_input_ids"))
    logp.data["logprobs"] = logp.data["logprobs"] * mask_T1
    data.update_(logp)
    ref = iface.inference(inference_model(tokenizer, seed=1), ids, NO_LIMIT)
    data.update_(ref.remap_keys({"logprobs": "ref_logprobs"}))
    n = sum(group_sizes)
    g = torch.Generator().manual_seed(seed)
    data.update_(per_sequence(data, torch.randn(n, generator=g).tolist()))
    no_eos = [[torch.tensor([bool(b)]) for b in (torch.rand(len(lens), generator=g) < 0.3)]
              for lens in data.seqlens["packed_input_ids"]]  # fmt: skip
    data.update_(SequenceSample.from_sequences(data.ids, {"no_eos_mask": no_eos}))
    return data
