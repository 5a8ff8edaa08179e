"""A tiny packed-sequence LM and helpers shared by the engine tests."""

from __future__ import annotations

import torch
from torch import nn

from realflow.api.data import SequenceSample
from realflow.engines import EngineConfig, OptimizerConfig, TrainEngine, build_train_engine

VOCAB = 48


class TinyLM(nn.Module):
    """Embedding + 2 linear layers over packed token ids; `cu_seqlens_B1` is accepted (as the
    real model's signature) but the model is position-wise, so it is unused."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids_T: torch.Tensor, cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(self.emb(input_ids_T))))


def make_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def make_batch(n: int = 6, seed: int = 0, start_id: int = 0) -> SequenceSample:
    """`n` sequences of 3..10 random tokens under key `ids`."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 11, (n,), generator=g).tolist()
    seqs = [torch.randint(0, VOCAB, (n_tok,), generator=g) for n_tok in lens]
    return SequenceSample.from_sequences(list(range(start_id, start_id + n)), {"ids": seqs})


def n_targets(mb: SequenceSample) -> int:
    """Next-token targets of a micro-batch: one fewer than the tokens, per sequence."""
    return sum(n - 1 for n in mb.flat_seqlens("ids"))


def loss_fn(module: nn.Module, mb: SequenceSample) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean next-token cross entropy within each sequence of the micro-batch."""
    assert mb.data is not None
    ids = mb.data["ids"]
    cu = mb.cu_seqlens("ids")
    logits = module(ids, cu).float()
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[cu[1:] - 1] = False  # the last token of a sequence predicts nothing
    loss = nn.functional.cross_entropy(logits[keep], ids.roll(-1)[keep])
    return loss, {"n_targets": float(n_targets(mb))}


def train(
    engine: TrainEngine, batches: list[SequenceSample], n_mbs: int = 1
) -> list[dict[str, float]]:
    """One `train_batch` per batch, each split into `n_mbs` micro-batches."""
    return [engine.train_batch(b.split(n_mbs), loss_fn, n_targets) for b in batches]


def build(
    backend: str = "torch",
    zero_stage: int = 2,
    seed: int = 0,
    total_steps: int = 10,
    state: dict[str, torch.Tensor] | None = None,
    dp_group: object = None,
    bf16: bool = False,
    offload: bool = False,
    **optim: float | str,
) -> TrainEngine:
    """A fresh engine on a seeded TinyLM (with weights `state` loaded when given)."""
    model = make_model(seed)
    if state is not None:
        model.load_state_dict(state)
    optim_cfg = OptimizerConfig(**{"lr": 1e-2, "warmup_steps_proportion": 0.2, **optim})
    engine_cfg = EngineConfig(backend=backend, zero_stage=zero_stage, bf16=bf16, offload=offload)
    return build_train_engine(model, engine_cfg, optim_cfg, total_steps, dp_group=dp_group)


def weights(engine: TrainEngine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module_state_dict().items()}
