"""Helpers of the interface tests: tiny models (tiny-llama: 2 layers, hidden 64), the built-in tokenizer and batches from the
built-in datasets."""

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
