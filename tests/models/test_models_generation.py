"""Packed KV-cached generation vs transformers' generate, log-probs, stopping, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from models_testutils import EOS, HF_CASES, hf_model, random_packed, reference_logprobs

from realflow.models.builtin import builtin_config
from realflow.models.generation import GenerationConfig, generate
from realflow.models.hf_io import load_hf
from realflow.models.transformer import PackedTransformer

PROMPT_LENS = [3, 11, 6, 1, 9]


def _answers(out):
    cu = out.output_cu_seqlens_B1
    return [out.output_ids_T[cu[b] : cu[b + 1]].tolist() for b in range(len(cu) - 1)]


def _hf_greedy(hf, ids, cu, max_new, stop, min_new=0):
    answers = []
    for b in range(len(cu) - 1):
        prompt = ids[cu[b] : cu[b + 1]][None]
        full = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=0,
        )[0, prompt.shape[1] :].tolist()
        # HF pads finished rows; cut after the first stop token.
        cut = next((i + 1 for i, t in enumerate(full) if t in stop), len(full))
        answers.append(full[:cut])
    return answers


@pytest.mark.parametrize("case", list(HF_CASES))
def test_greedy_equals_hf_generate(case, hf_dirs):
    model, _ = load_hf(hf_dirs[case], load_tokenizer=False)
    hf = hf_model(case)
    ids, cu = random_packed(PROMPT_LENS, seed=11)
    free = _answers(generate(model, ids, cu, GenerationConfig(max_new_tokens=16, greedy=True)))
    # Stop tokens taken from the free-running answers, so some sequences stop early.
    stop_tokens = sorted({free[0][4], free[2][7]} - {EOS})
    gconfig = GenerationConfig(max_new_tokens=16, greedy=True, stop_token_ids=stop_tokens)
    out = generate(model, ids, cu, gconfig)
    ref = _hf_greedy(hf, ids, cu, 16, [EOS, *stop_tokens])
    assert _answers(out) == ref
    assert any(len(a) < 16 for a in ref)
    ended_by_stop = [a[-1] in [EOS, *stop_tokens] for a in ref]
    assert out.no_eos_mask_B.tolist() == [not e for e in ended_by_stop]
    assert out.output_lens_B.tolist() == [len(a) for a in ref]


def test_min_new_tokens_equals_hf(hf_dirs):
    model, _ = load_hf(hf_dirs["llama"], load_tokenizer=False)
    hf = hf_model("llama")
    ids, cu = random_packed(PROMPT_LENS, seed=12)
    free = _answers(generate(model, ids, cu, GenerationConfig(max_new_tokens=12, greedy=True)))
    stop = [free[1][1], free[3][2]]
    gconfig = GenerationConfig(
        max_new_tokens=12, min_new_tokens=5, greedy=True, stop_token_ids=stop
    )
    answers = _answers(generate(model, ids, cu, gconfig))
    assert answers == _hf_greedy(hf, ids, cu, 12, [EOS, *stop], min_new=5)
    assert all(len(a) >= 5 for a in answers)


def _reference_answer_logprobs(model, ids, cu, out, gconfig, stop_ids):
    """Per answer token, its log-prob under the reference sampling distribution of the logits
    of one packed forward over prompt + answer (stop tokens masked for min_new_tokens); every
    drawn token must be allowed there."""
    full_ids, full_cu, prompt_mask = out.with_prompts(ids, cu)
    with torch.no_grad():
        logits = model(full_ids, full_cu).double()
    want = []
    for b in range(len(full_cu) - 1):
        n_prompt = int(prompt_mask[full_cu[b] : full_cu[b + 1]].sum())
        for j, pos in enumerate(range(int(full_cu[b]) + n_prompt, int(full_cu[b + 1]))):
            row = logits[pos - 1].tolist()  # token at pos is predicted by position pos - 1
            if j < gconfig.min_new_tokens:
                for s in stop_ids:
                    row[s] = -math.inf
            allowed = reference_logprobs(row, gconfig)
            token = int(full_ids[pos])
            assert token in allowed, (b, j, token, sorted(allowed))
            want.append(allowed[token])
    return torch.tensor(want, dtype=torch.float32)


@pytest.mark.parametrize(
    "gconfig",
    [
        GenerationConfig(max_new_tokens=10, greedy=True),
        GenerationConfig(max_new_tokens=10, temperature=0.7),
        GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9),
        GenerationConfig(max_new_tokens=10, temperature=1.3, top_p=0.5),
        GenerationConfig(max_new_tokens=10, top_k=3),
        GenerationConfig(
            max_new_tokens=10, min_new_tokens=4, top_p=0.8, eos_token_ids=[3], stop_token_ids=[5]
        ),
    ],
    ids=["greedy", "temp", "temp-topk-topp", "topp", "topk", "topp-min-new"],
)
def test_logprobs_are_those_of_the_sampled_distribution(gconfig):
    """GenerationOutput.logprobs_T is the log-prob of each token under the distribution it was
    drawn from (temperature, top-k, top-p as documented; the plain softmax when greedy)."""
    torch.manual_seed(0)
    model = PackedTransformer(builtin_config("tiny-qwen2", vocab_size=64, initializer_range=0.2))
    ids, cu = random_packed(PROMPT_LENS, seed=13)
    ids = ids % 64
    out = generate(model, ids, cu, gconfig, generator=torch.Generator().manual_seed(0))
    stop = [*(gconfig.eos_token_ids or model.config.eos_token_ids), *gconfig.stop_token_ids]
    want = _reference_answer_logprobs(model, ids, cu, out, gconfig, stop)
    assert out.logprobs_T.shape == out.output_ids_T.shape
    assert torch.isfinite(out.logprobs_T).all()
    assert (out.logprobs_T - want).abs().max() < 1e-4


def test_sampling_is_deterministic_under_a_seed():
    torch.manual_seed(0)
    model = PackedTransformer(builtin_config("tiny-gpt2", vocab_size=64))
    ids, cu = random_packed(PROMPT_LENS, seed=14)
    ids = ids % 64
    gconfig = GenerationConfig(max_new_tokens=20, top_k=30, stop_token_ids=[5, 6, 7])

    def run(seed):
        return generate(model, ids, cu, gconfig, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.output_ids_T, b.output_ids_T) and torch.equal(a.logprobs_T, b.logprobs_T)
    assert not torch.equal(a.output_ids_T, c.output_ids_T)


def test_finished_sequences_leave_the_batch():
    torch.manual_seed(0)
    model = PackedTransformer(builtin_config("tiny-llama", vocab_size=32, initializer_range=0.2))
    ids, cu = random_packed([4, 4, 4, 4, 4, 4], seed=15)
    ids = ids % 32
    batch_sizes = []
    model.embed_tokens.register_forward_hook(
        lambda m, args, out: batch_sizes.append(args[0].numel())
    )
    stops = list(range(0, 32, 3))  # ~1/3 of the vocabulary stops a sequence
    gconfig = GenerationConfig(max_new_tokens=30, stop_token_ids=stops, eos_token_ids=[])
    out = generate(model, ids, cu, gconfig, generator=torch.Generator().manual_seed(0))
    assert batch_sizes[0] == 24  # the packed prefill
    decode = batch_sizes[1:]
    assert decode == sorted(decode, reverse=True) and decode[-1] < 6
    assert len(decode) == int(out.output_lens_B.max()) - 1
    for b, ans in enumerate(_answers(out)):
        assert all(t not in stops for t in ans[:-1])
        assert out.no_eos_mask_B[b] == (ans[-1] not in stops)


def test_with_prompts_packs_prompt_and_answer():
    torch.manual_seed(0)
    model = PackedTransformer(builtin_config("tiny-llama", vocab_size=32))
    ids, cu = random_packed([2, 5], seed=16)
    ids = ids % 32
    out = generate(model, ids, cu, GenerationConfig(max_new_tokens=3, greedy=True))
    full, full_cu, prompt_mask = out.with_prompts(ids, cu)
    assert full_cu.tolist() == [0, 5, 13]
    assert prompt_mask.tolist() == [True] * 2 + [False] * 3 + [True] * 5 + [False] * 3
    assert full[:2].tolist() == ids[:2].tolist()


def test_bf16_autocast_generation_runs():
    torch.manual_seed(0)
    model = PackedTransformer(
        builtin_config("tiny-llama", vocab_size=32, autocast_dtype="bfloat16")
    )
    ids, cu = random_packed([3, 7], seed=17)
    out = generate(model, ids % 32, cu, GenerationConfig(max_new_tokens=4))
    assert out.output_ids_T.numel() == 8 and out.logprobs_T.dtype == torch.float32


def test_generation_config_and_model_checks():
    with pytest.raises(ValueError) as err:
        GenerationConfig(max_new_tokens=0, temperature=0.0, top_p=1.5, top_k=-1)
    for word in ("max_new_tokens", "temperature", "top_p", "top_k"):
        assert word in str(err.value)
    critic = PackedTransformer(builtin_config("tiny-llama", vocab_size=32), head="critic")
    ids, cu = random_packed([3], seed=18)
    with pytest.raises(ValueError, match="head 'lm'"):
        generate(critic, ids % 32, cu, GenerationConfig())
    gpt2 = PackedTransformer(builtin_config("tiny-gpt2", vocab_size=32, max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(gpt2, ids % 32, cu, GenerationConfig(max_new_tokens=6))
