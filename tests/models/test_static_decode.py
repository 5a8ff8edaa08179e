"""The static decode engine (fixed buffers, dense batch; CUDA graphs on a GPU) against the eager
engine, which compacts finished rows away: same tokens, log-probs and stops under one seed."""

from __future__ import annotations

import pytest
import torch
from models_testutils import random_packed

from realflow.models import static_decode
from realflow.models.builtin import builtin_config
from realflow.models.generation import GenerationConfig, generate
from realflow.models.kv_cache import KVCache
from realflow.models.transformer import PackedTransformer

PROMPT_LENS = [3, 11, 6, 1, 9]
V = 32
STOPS = [0, 7, 13, 20, 29]  # ~1/6 of the vocabulary ends a sequence: long-tailed lengths


def _model(name="tiny-qwen2"):
    torch.manual_seed(0)
    return PackedTransformer(builtin_config(name, vocab_size=V, initializer_range=0.2))


def _run(model, gconfig, engine, n_per_prompt=1, seed=0):
    ids, cu = random_packed(PROMPT_LENS, seed=5)
    g = GenerationConfig(**{**gconfig.__dict__, "engine": engine})
    gen = torch.Generator().manual_seed(seed)
    return generate(model, ids % V, cu, g, generator=gen, n_per_prompt=n_per_prompt)


def _same(a, b):
    assert torch.equal(a.output_lens_B, b.output_lens_B)
    assert torch.equal(a.output_ids_T, b.output_ids_T)
    assert torch.equal(a.no_eos_mask_B, b.no_eos_mask_B)
    torch.testing.assert_close(a.logprobs_T, b.logprobs_T, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.plain_logprobs_T, b.plain_logprobs_T, atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def small_attend_block(monkeypatch):
    """Attention slots in blocks of 4, so a run crosses several step shapes."""
    init = static_decode.StaticDecoder.__init__

    def patched(self, *args, **kw):
        init(self, *args, **{**kw, "attend_block": 4})

    monkeypatch.setattr(static_decode.StaticDecoder, "__init__", patched)


GCONFIGS = [
    GenerationConfig(max_new_tokens=24, greedy=True, eos_token_ids=[], stop_token_ids=STOPS),
    GenerationConfig(max_new_tokens=24, eos_token_ids=[], stop_token_ids=STOPS),
    GenerationConfig(max_new_tokens=24, temperature=0.8, top_k=10, top_p=0.9, eos_token_ids=[3]),
    GenerationConfig(max_new_tokens=20, min_new_tokens=6, eos_token_ids=[], stop_token_ids=STOPS),
    GenerationConfig(max_new_tokens=12, eos_token_ids=[]),  # no stop at all
]


@pytest.mark.parametrize(
    "gconfig", GCONFIGS, ids=["greedy", "sample", "filters", "min-new", "no-eos"]
)
@pytest.mark.parametrize("n_per_prompt", [1, 3])
def test_static_engine_equals_eager_engine(gconfig, n_per_prompt):
    model = _model()
    eager = _run(model, gconfig, "eager", n_per_prompt)
    static = _run(model, gconfig, "static", n_per_prompt)
    _same(eager, static)
    if gconfig.stop_token_ids:  # the case is meaningful: some rows stopped early, some did not
        lens = eager.output_lens_B
        assert int(lens.min()) < gconfig.max_new_tokens and bool((~eager.no_eos_mask_B).any())


def test_static_engine_with_learned_positions_and_another_seed():
    model = _model("tiny-gpt2")
    g = GCONFIGS[1]
    _same(_run(model, g, "eager", seed=3), _run(model, g, "static", seed=3))
    assert not torch.equal(
        _run(model, g, "static", seed=3).output_ids_T, _run(model, g, "static", seed=4).output_ids_T
    )


def test_static_engine_keeps_the_batch_dense_and_never_moves_cache_rows(monkeypatch):
    model = _model()
    batch_sizes = []
    model.embed_tokens.register_forward_hook(lambda m, a, out: batch_sizes.append(a[0].numel()))

    def no_keep(self, rows_N):
        raise AssertionError("the static engine must not compact the KV cache")

    monkeypatch.setattr(KVCache, "keep", no_keep)
    out = _run(model, GCONFIGS[1], "static", n_per_prompt=2)
    b = 2 * len(PROMPT_LENS)
    assert batch_sizes[0] == sum(PROMPT_LENS)  # one packed prefill
    decode = batch_sizes[1:]
    assert set(decode) == {b}
    # it stops within CHECK_EVERY steps of the last row's stop, not at max_new_tokens
    longest = int(out.output_lens_B.max())
    assert longest - 1 <= len(decode) < longest - 1 + static_decode.CHECK_EVERY or (
        len(decode) == GCONFIGS[1].max_new_tokens - 1
    )


def test_engine_is_checked_and_auto_is_eager_on_cpu(monkeypatch):
    with pytest.raises(ValueError, match="engine \\('fast'\\) must be one of"):
        GenerationConfig(engine="fast")
    calls = []
    monkeypatch.setattr(static_decode, "static_decode_loop", lambda *a, **kw: calls.append(1) / 0)
    _run(_model(), GCONFIGS[0], "auto")
    assert calls == []


# Ops whose output shape or value must come back to the host before the next op can be queued:
# on CUDA each one syncs (so the step could not be a CUDA graph).
HOST_SYNC_OPS = {
    "aten::_local_scalar_dense",  # .item(), bool(tensor), int(tensor)
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",
    "aten::isin",  # sorts through unique for more than ~10 elements (inside the op: not seen)
}


def test_a_decode_step_calls_no_op_that_waits_for_the_host(monkeypatch):
    """Every aten op of every decode step (the part a CUDA graph captures) is recorded on CPU:
    none of them is one that needs its result on the host (such as torch.isin's unique, for
    a batch of more than ~10 rows)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func._schema.name)
            return func(*args, **(kwargs or {}))

    record = Record()
    body = static_decode.StaticDecoder.body

    def recorded_body(self, *args):
        with record:
            body(self, *args)

    monkeypatch.setattr(static_decode.StaticDecoder, "body", recorded_body)
    g = GenerationConfig(
        max_new_tokens=8, min_new_tokens=2, top_k=5, top_p=0.9, stop_token_ids=STOPS
    )
    _run(_model(), g, "static", n_per_prompt=4)  # 20 rows: torch.isin would sort here
    assert "aten::mm" in record.ops or "aten::addmm" in record.ops  # the model ran in it
    assert not record.ops & HOST_SYNC_OPS


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_under_a_callers_autocast_the_cache_holds_what_attention_reads(monkeypatch, engine):
    """fp32 weights under a caller's bf16 autocast (a train engine generating): keys/values come
    out of bf16 matmuls, so a bf16 cache loses nothing against an fp32 one and is not cast back
    for every decode attention."""
    from realflow.models import generation

    dtypes = []
    init = KVCache.__init__

    def spy(self, *args, **kw):
        init(self, *args, **kw)
        dtypes.append(self._k.dtype)

    monkeypatch.setattr(KVCache, "__init__", spy)
    model = _model()
    g = GCONFIGS[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(model, g, engine, n_per_prompt=2)
        monkeypatch.setattr(generation, "_cache_dtype", lambda m: torch.float32)
        want = _run(model, g, engine, n_per_prompt=2)
    assert dtypes == [torch.bfloat16, torch.float32]
    _same(got, want)
