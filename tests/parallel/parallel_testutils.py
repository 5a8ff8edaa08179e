"""Helpers for parallel tests: tiny configs of every registered family (built from HF config
dicts by the family's own converter), packed batches, and a gloo world of N processes."""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from realflow.api.registry import MODEL_FAMILIES
from realflow.models.config import TransformerConfig
from realflow.models.transformer import PackedTransformer

VOCAB = 101  # prime: no tp degree divides it, so vocab shards are uneven

_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)
# case -> (family, HF config.json dict). Every registered family has at least one case.
HF_CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(model_type="llama", num_key_value_heads=2, **_SIZES)),
    "llama_kv1": ("llama", dict(model_type="llama", num_key_value_heads=1, **_SIZES)),
    "qwen2": (
        "qwen2",
        dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True, **_SIZES),
    ),
    "gpt2": (
        "gpt2",
        dict(
            model_type="gpt2",
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


def tiny_config(case: str, **changes) -> TransformerConfig:
    """The realflow config of one of HF_CASES, through its family's converter."""
    family, hf = HF_CASES[case]
    return MODEL_FAMILIES.get(family).config_from_hf(hf).replace(**changes)


def registered_families() -> set[str]:
    return set(MODEL_FAMILIES.names())


def reference_model(config: TransformerConfig, head: str = "lm", seed: int = 0):
    """The whole model on one process, seeded (fp32)."""
    torch.manual_seed(seed)
    return PackedTransformer(config, head)


def packed_batch(lens: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids_T, cu_seqlens_B1) of random tokens >= 3 (no special ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (sum(lens),), generator=g)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return ids, cu


def check_greedy_generation(model, groups, ref, what: str) -> None:
    """Greedy generation of a sharded model equals the whole model's (tokens; log-probs 1e-5)."""
    from realflow.models.generation import GenerationConfig, generate
    from realflow.parallel.generate import parallel_generate

    prompts, cu = packed_batch([3, 6, 2], seed=9)
    g = GenerationConfig(max_new_tokens=6, greedy=True)
    want = generate(ref, prompts, cu, g)
    got = parallel_generate(model, groups, prompts, cu, g)
    assert torch.equal(got.output_ids_T, want.output_ids_T), what
    torch.testing.assert_close(got.logprobs_T, want.logprobs_T, rtol=1e-5, atol=1e-5, msg=what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    fn(rank, world, *args)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def run_world(fn, world: int, *args) -> None:
    """Run `fn(rank, world, *args)` in `world` gloo processes; a failure in any is raised."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world)
