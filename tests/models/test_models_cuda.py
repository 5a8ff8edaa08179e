"""The CUDA model layer on a GPU (skipped without one; benchmarks/gpu/run.sh runs them first):
the varlen attention kernels against a per-sequence reference, the packed model against HF in
bf16 and fp32, and the static decode engine's CUDA graphs (same tokens as without graphs, no
host sync per step, greedy equal to HF in fp32).

bf16 tolerances come from a bf16 reference: a bf16 result may be at most a small multiple of
the error that the per-sequence SDPA (or HF's own forward) makes in bf16 against fp32.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from models_testutils import EOS, hf_model, pad_batch, random_packed, unpad

from realflow.models import static_decode
from realflow.models.attention import (
    ATTN_BACKENDS,
    PackedSeqs,
    flash_attn_available,
    torch_varlen_params,
    varlen_attention,
)
from realflow.models.generation import GenerationConfig, generate
from realflow.models.hf_io import load_hf

pytestmark = pytest.mark.cuda

LENS = [1, 5, 17, 64, 3, 200, 33, 128, 9]  # long-tailed, with a 1-token sequence
CUDA = torch.device("cuda")


def _kernels() -> list[str]:
    names = ["sdpa_bucketed"]
    if torch_varlen_params() is not None:
        names.append("torch_varlen")
    if flash_attn_available():
        names.append("flash")
    return names


def _qkv(dtype, h=14, kv=2, d=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(LENS)
    qkv = [torch.randn(t, n, d, generator=g, device=CUDA) for n in (h, kv, kv)]
    cu = torch.zeros(len(LENS) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(LENS).cumsum(0)
    return [x.to(dtype).requires_grad_(True) for x in qkv], cu.to(CUDA)


def _fwd_bwd(impl, qkv, cu, w):
    seqs = PackedSeqs.from_cu_seqlens(cu)
    out = varlen_attention(*qkv, seqs, impl, qkv[0].shape[-1] ** -0.5)
    grads = torch.autograd.grad((out.float() * w).sum(), qkv)
    return [out.detach().float(), *(g.float() for g in grads)]


@pytest.mark.parametrize("impl", _kernels())
def test_attention_kernels_match_the_per_sequence_reference(impl):
    (q, k, v), cu = _qkv(torch.float32)
    w = torch.randn(q.shape, device=CUDA)
    ref = _fwd_bwd("sdpa_varlen", [q, k, v], cu, w)  # fp32, one SDPA per sequence
    if impl == "sdpa_bucketed":  # fp32 too: equal up to fp32 rounding
        for got, want in zip(_fwd_bwd(impl, [q, k, v], cu, w), ref):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    low = [x.detach().bfloat16().requires_grad_(True) for x in (q, k, v)]
    base = _fwd_bwd("sdpa_varlen", low, cu, w)
    for got, b, want in zip(_fwd_bwd(impl, low, cu, w), base, ref):
        bf16_err = float((b - want).abs().max())
        assert float((got - want).abs().max()) <= 2 * bf16_err + 1e-3, (impl, bf16_err)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_model_matches_hf_on_cuda(hf_dirs, dtype):
    """attn_impl auto on CUDA (torch_varlen / flash in bf16, sdpa_bucketed in fp32)."""
    model, _ = load_hf(hf_dirs["qwen2"], load_tokenizer=False, device="cuda", dtype=dtype)
    hf32 = hf_model("qwen2").to(CUDA).eval()
    hf_low = hf_model("qwen2").to(CUDA, getattr(torch, dtype)).eval()
    ids, cu = random_packed(LENS, seed=1)
    padded, mask = pad_batch(ids, cu)
    ids, cu, padded, mask = ids.cuda(), cu.cuda(), padded.cuda(), mask.cuda()
    with torch.no_grad():
        ours = model(ids, cu).float()
        want = unpad(hf32(input_ids=padded, attention_mask=mask).logits, cu).float()
        hf_err = (unpad(hf_low(input_ids=padded, attention_mask=mask).logits, cu) - want).abs()
    if dtype == "float32":
        assert float((ours - want).abs().max()) <= 1e-4
    else:
        assert float((ours - want).abs().max()) <= 2 * float(hf_err.max()) + 1e-2


def _generate(model, gconfig, seed=0, **changes):
    ids, cu = random_packed([3, 11, 6, 1, 9, 40, 2, 7], seed=5)
    g = GenerationConfig(**{**gconfig.__dict__, **changes})
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return generate(model, ids.cuda(), cu.cuda(), g, generator=gen, n_per_prompt=2)


STOPS = [EOS, 7, 13, 20, 29, 41, 55, 60, 77, 90]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "autocast"])
def test_cuda_graphs_give_the_tokens_of_the_same_step_run_eagerly(hf_dirs, dtype):
    """`autocast`: fp32 weights under a caller's bf16 autocast with its cast cache on (how a
    train engine generates), which the graphs must not capture."""
    weights = "float32" if dtype == "autocast" else dtype
    model, _ = load_hf(hf_dirs["llama"], load_tokenizer=False, device="cuda", dtype=weights)
    g = GenerationConfig(max_new_tokens=40, greedy=True, stop_token_ids=STOPS)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "autocast" else nullcontext()
    with ctx:
        graphs = _generate(model, g, engine="static", cuda_graphs=True)
    with ctx:
        eager = _generate(model, g, engine="static", cuda_graphs=False)
    assert torch.equal(graphs.output_ids_T, eager.output_ids_T)
    assert torch.equal(graphs.output_lens_B, eager.output_lens_B)
    torch.testing.assert_close(graphs.logprobs_T, eager.logprobs_T, atol=1e-5, rtol=0)
    assert int(graphs.output_lens_B.min()) < 40  # some rows stopped early


def test_sampling_in_graphs_is_seeded_and_its_logprobs_are_the_models(hf_dirs):
    model, _ = load_hf(hf_dirs["llama"], load_tokenizer=False, device="cuda")
    t = 0.9
    g = GenerationConfig(max_new_tokens=30, temperature=t, top_k=40, stop_token_ids=STOPS)
    a, b = _generate(model, g, seed=1), _generate(model, g, seed=1)
    c = _generate(model, g, seed=2)
    assert torch.equal(a.output_ids_T, b.output_ids_T)
    assert not torch.equal(a.output_ids_T, c.output_ids_T)
    # plain log-probs equal a forward pass over prompt + answer (what PPO trains on)
    ids, cu = random_packed([3, 11, 6, 1, 9, 40, 2, 7], seed=5)
    full, full_cu, prompt_mask = a.with_prompts(ids.cuda(), cu.cuda())
    with torch.no_grad():
        logp = torch.log_softmax(model(full, full_cu).float() / t, -1)
    pred = logp[:-1].gather(-1, full[1:, None]).squeeze(-1)
    answer = ~prompt_mask[1:]  # tokens predicted by the previous position, answers only
    torch.testing.assert_close(pred[answer], a.plain_logprobs_T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_decode_steps_never_wait_for_the_host(hf_dirs, monkeypatch, cuda_graphs):
    """Every replayed step (graphs) or every step (no graphs) runs with CUDA's sync debug mode
    set to error: nothing in the step reads a value back to the host."""
    model, _ = load_hf(hf_dirs["llama"], load_tokenizer=False, device="cuda", dtype="bfloat16")
    monkeypatch.setattr(static_decode, "CHECK_EVERY", 10**9)
    strict = []
    step = static_decode.StaticDecoder.step

    def strict_step(self, i):
        key = (self.attend_len(i), i < self.gconfig.min_new_tokens)
        if self.use_graphs and key not in self._graphs:
            return step(self, i)  # the warm-up and captures synchronise, once per shape
        strict.append(i)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(self, i)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(static_decode.StaticDecoder, "step", strict_step)
    g = GenerationConfig(max_new_tokens=24, min_new_tokens=3, top_p=0.9, stop_token_ids=STOPS)
    _generate(model, g, cuda_graphs=cuda_graphs)
    assert len(strict) >= 18


@pytest.mark.parametrize("case", ["llama", "qwen2", "gpt2"])
def test_static_engine_greedy_equals_hf_generate_in_fp32(hf_dirs, case):
    model, _ = load_hf(hf_dirs[case], load_tokenizer=False, device="cuda")
    hf = hf_model(case).to(CUDA).eval()
    ids, cu = random_packed([3, 11, 6, 1, 9], seed=7)
    ids, cu = ids.cuda(), cu.cuda()
    out = generate(model, ids, cu, GenerationConfig(max_new_tokens=12, greedy=True))
    for b in range(len(cu) - 1):
        prompt = ids[cu[b] : cu[b + 1]][None]
        with torch.no_grad():
            full = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=[EOS],
                pad_token_id=0,
            )[0, prompt.shape[1] :].tolist()
        cut = next((i + 1 for i, t in enumerate(full) if t == EOS), len(full))
        got = out.output_ids_T[out.output_cu_seqlens_B1[b] : out.output_cu_seqlens_B1[b + 1]]
        assert got.tolist() == full[:cut], (case, b)


def test_every_backend_is_known():
    assert set(_kernels()) <= set(ATTN_BACKENDS)
