"""Training with adapters: only adapter parameters reach the optimizer and change; the base
weights stay bit-for-bit what the checkpoint holds, so a role computing with them (adapters
disabled, `BaseWeightsEngine`) equals the transformers base model and a separate copy; merged
generation equals generation through the adapter layers; the engine state resumes exactly."""

from __future__ import annotations

import pytest
import torch
from models_testutils import hf_model, make_tokenizer, random_packed

from realflow.api.data import SequenceSample
from realflow.engines import EngineConfig, InferenceEngine, OptimizerConfig, build_train_engine
from realflow.engines.config import AdapterSpec
from realflow.engines.tuners import (
    AdapterError,
    BaseWeightsEngine,
    adapter_names,
    apply_adapters,
)
from realflow.models.generation import GenerationConfig, generate
from realflow.models.hf_io import load_hf

LORA = AdapterSpec("lora", ("all-linear",), {"r": 4, "lora_alpha": 8})
OPTIM = OptimizerConfig(lr=1e-2, lr_scheduler_type="constant", warmup_steps_proportion=0.0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    hf_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def lora_engine(path, spec=LORA, seed=0, engine_cfg=None, dtype=torch.float32):
    module = load_hf(path, dtype=dtype, load_tokenizer=False).model
    apply_adapters(module, spec, seed=seed, base_path=str(path))
    return build_train_engine(module, engine_cfg or EngineConfig(), OPTIM, 100)


def batch(seed: int, n: int = 4) -> SequenceSample:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(4, 12, (n,), generator=g).tolist()
    seqs = [torch.randint(3, 101, (k,), generator=g) for k in lens]
    return SequenceSample.from_sequences(list(range(n)), {"ids": seqs})


def lm_loss(module, mb):
    ids, cu = mb.data["ids"], mb.cu_seqlens("ids")
    logits = module(ids, cu).float()
    keep = torch.ones(ids.shape[0], dtype=torch.bool)
    keep[cu[1:].long() - 1] = False
    return torch.nn.functional.cross_entropy(logits[keep], ids.roll(-1)[keep]), {}


def n_tokens(mb):
    return float(mb.data["ids"].numel())


def train(engine, seeds):
    for s in seeds:
        engine.train_batch([batch(s)], lm_loss, n_tokens)


def base_weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}


def test_only_adapters_reach_the_optimizer_and_change(llama_dir):
    engine = lora_engine(llama_dir)
    module = engine.module
    lora = {n for n, _ in module.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert set(adapter_names(module)) == lora and len(lora) == 2 * 7 * 2
    in_optimizer = {id(p) for g in engine.backend.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in module.named_parameters() if n in lora}
    base_before = base_weights(module)
    adapters_before = {n: p.detach().clone() for n, p in module.named_parameters() if n in lora}
    train(engine, [1, 2, 3])
    for n, p in module.named_parameters():
        if n in lora:
            assert not torch.equal(p, adapters_before[n]), n
        else:
            assert torch.equal(p, base_before[n]), n


def test_base_weights_role_equals_transformers_base_and_a_separate_copy(llama_dir):
    import transformers

    engine = lora_engine(llama_dir)
    train(engine, [1, 2])
    ref = BaseWeightsEngine(engine, "actor")
    copy = load_hf(llama_dir, dtype=torch.float32, load_tokenizer=False).model
    separate = InferenceEngine(copy.requires_grad_(False), EngineConfig())
    ids_T, cu = random_packed([6, 4, 9], seed=5)
    shared = ref.forward_no_grad(lambda m: m(ids_T, cu))
    assert torch.equal(shared, separate.forward_no_grad(lambda m: m(ids_T, cu)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        want = torch.cat(
            [hf(input_ids=ids_T[a:b][None]).logits[0] for a, b in zip(cu[:-1], cu[1:])]
        )
    torch.testing.assert_close(shared, want, atol=2e-5, rtol=1e-5)
    adapted = engine.forward_no_grad(lambda m: m(ids_T, cu))  # adapters are back on
    assert (adapted - shared).abs().max() > 1e-3
    assert {n for n, p in engine.module.named_parameters() if p.requires_grad} == set(
        adapter_names(engine.module)
    )
    train(engine, [3])  # and training goes on


def test_base_weights_need_frozen_biases(llama_dir):
    engine = lora_engine(llama_dir, AdapterSpec("lora", ("all-linear",), {"r": 2, "bias": "all"}))
    with pytest.raises(AdapterError, match="train biases"):
        BaseWeightsEngine(engine, "actor")


def test_merged_generation_equals_generation_through_adapters(llama_dir):
    merged_engine = lora_engine(llama_dir, engine_cfg=EngineConfig(generate_merged=True))
    plain_engine = lora_engine(llama_dir, engine_cfg=EngineConfig(generate_merged=False))
    for e in (merged_engine, plain_engine):
        train(e, [1, 2])
    before = {n: p.detach().clone() for n, p in merged_engine.module.named_parameters()}
    prompts, cu = random_packed([3, 5, 4], seed=7)
    gconfig = GenerationConfig(max_new_tokens=6, greedy=True, eos_token_ids=[])
    outs = [
        e.forward_generate(lambda m: generate(m, prompts, cu, gconfig))
        for e in (merged_engine, plain_engine)
    ]
    assert torch.equal(outs[0].output_ids_T, outs[1].output_ids_T)
    torch.testing.assert_close(outs[0].logprobs_T, outs[1].logprobs_T, atol=1e-5, rtol=1e-5)
    after = dict(merged_engine.module.named_parameters())
    assert before.keys() == after.keys()  # the peft layers are back in place, untouched
    assert all(torch.equal(before[n], after[n]) for n in before)
    base = InferenceEngine(load_hf(llama_dir, dtype=torch.float32).model, EngineConfig())
    unadapted = base.forward_generate(lambda m: generate(m, prompts, cu, gconfig))
    assert not torch.equal(unadapted.logprobs_T, outs[0].logprobs_T)


def test_engine_state_resumes_adapters_exactly(llama_dir):
    straight = lora_engine(llama_dir)
    train(straight, [1, 2, 3, 4])
    first = lora_engine(llama_dir)
    train(first, [1, 2])
    state = first.state_dict()
    assert set(state["weights"]) == set(adapter_names(first.module))  # not the base weights
    resumed = lora_engine(llama_dir, seed=99)  # other initial adapters: the state replaces them
    resumed.load_state_dict(state)
    train(resumed, [3, 4])
    for (n, a), (_, b) in zip(
        straight.module.named_parameters(), resumed.module.named_parameters()
    ):
        assert torch.equal(a, b), n


def test_bf16_base_stays_bf16_under_fp32_adapters(llama_dir):
    engine = lora_engine(llama_dir, engine_cfg=EngineConfig(bf16=True), dtype=torch.bfloat16)
    dtypes = {p.requires_grad: p.dtype for p in engine.module.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    assert engine.save_dtype == torch.bfloat16
    train(engine, [1])
