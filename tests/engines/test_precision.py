"""Mixed precision of trained models: fp32 master weights and optimizer state whatever dtype the
weights arrive in, bf16 only as compute, the save dtype, and exact resume when the saved weights
are lower precision than the masters.

The reference is an fp32 twin: the same weights upcast to fp32 before the engine sees them. The
upcast is exact, so a correct engine trains the bf16 module bit for bit like its twin (same fp32
masters, same compute); pure-bf16 training rounds away every update below half a bf16 ulp
(2^-9 relative), which at lr 1e-6 is nearly all of them.
"""

import pytest
import torch
from engine_testutils import make_batch, make_model, train

from realflow.engines import EngineConfig, EngineError, OptimizerConfig, build_train_engine

LOW_LR = dict(lr=1e-6, lr_scheduler_type="constant", warmup_steps_proportion=0.0)


def batches(n: int = 5) -> list:
    return [make_batch(6, seed=20 + i) for i in range(n)]


def engine_for(model: torch.nn.Module, **engine_kw):
    return build_train_engine(
        model, EngineConfig(**engine_kw), OptimizerConfig(**LOW_LR), total_train_steps=10
    )


def bf16_model_and_fp32_twin() -> tuple[torch.nn.Module, torch.nn.Module]:
    low = make_model(seed=3).to(torch.bfloat16)
    twin = make_model(seed=3)
    twin.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    return low, twin


def fraction_changed(before: dict, after: dict) -> float:
    n = sum(v.numel() for v in before.values())
    return sum((after[k].float() != before[k].float()).sum().item() for k in before) / n


def fp32_weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module_state_dict().items()}


@pytest.mark.parametrize("bf16_compute", [False, True])
def test_bf16_weights_train_like_their_fp32_twin(bf16_compute):
    low, twin = bf16_model_and_fp32_twin()
    start = {k: v.detach().clone() for k, v in twin.state_dict().items()}
    low_engine = engine_for(low, bf16=bf16_compute)
    twin_engine = engine_for(twin, bf16=bf16_compute)
    assert all(p.dtype == torch.float32 for p in low_engine.module.parameters())
    low_stats = train(low_engine, batches(), n_mbs=2)
    twin_stats = train(twin_engine, batches(), n_mbs=2)
    assert [s["loss"] for s in low_stats] == [s["loss"] for s in twin_stats]
    got, want = fp32_weights(low_engine), fp32_weights(twin_engine)
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    # ~every parameter moved (a few embedding rows of tokens no batch holds cannot)
    assert fraction_changed(start, got) > 0.9


def test_optimizer_state_is_fp32():
    low, _ = bf16_model_and_fp32_twin()
    engine = engine_for(low, bf16=True)
    train(engine, batches(1))
    moments = [t for s in engine.backend.optimizer.state.values() for t in s.values()]
    assert moments and all(t.dtype == torch.float32 for t in moments if t.ndim > 0)


@pytest.mark.parametrize(
    "arrives, save_dtype, expected",
    [
        (torch.bfloat16, "auto", torch.bfloat16),
        (torch.float32, "auto", torch.float32),
        (torch.bfloat16, "float32", torch.float32),
        (torch.float32, "float16", torch.float16),
    ],
)
def test_save_dtype(arrives, save_dtype, expected):
    engine = engine_for(make_model().to(arrives), save_dtype=save_dtype)
    assert engine.save_dtype == expected


def test_bad_save_dtype_is_an_error():
    problems = EngineConfig(save_dtype="bf16").validate()
    assert problems == [
        "save_dtype 'bf16' unknown; known: auto, float32, bfloat16, float16 (did you mean "
        "'bfloat16'?)"
    ]
    with pytest.raises(EngineError, match="save_dtype 'fp8' unknown"):
        engine_for(make_model(), save_dtype="fp8")


def test_mixed_dtype_module_is_an_error():
    model = make_model()
    model.fc.to(torch.bfloat16)
    with pytest.raises(EngineError, match="several dtypes"):
        engine_for(model)


def test_resume_from_bf16_saved_weights_is_bit_identical():
    """The HF checkpoint holds bf16 weights; the fp32 masters ride in the engine state."""
    data = batches()
    low, _ = bf16_model_and_fp32_twin()
    straight = engine_for(low)
    train(straight, data)

    low, _ = bf16_model_and_fp32_twin()
    first = engine_for(low)
    train(first, data[:3])
    state = first.state_dict()
    saved = {k: v.to(first.save_dtype) for k, v in first.module_state_dict().items()}
    assert first.save_dtype == torch.bfloat16

    resumed_module = make_model(seed=11).to(torch.bfloat16)
    resumed_module.load_state_dict(saved)
    resumed = engine_for(resumed_module)
    resumed.load_state_dict(state)
    train(resumed, data[3:])
    got, want = fp32_weights(resumed), fp32_weights(straight)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_state_carries_masters_only_when_the_save_dtype_loses_them():
    assert "weights" in engine_for(make_model().to(torch.bfloat16)).state_dict()
    assert "weights" not in engine_for(make_model()).state_dict()
    assert "weights" not in engine_for(make_model(), save_dtype="float32").state_dict()


@pytest.mark.parametrize(
    "trained, bf16, expected",
    [
        (True, False, torch.float32),
        (True, True, torch.float32),  # bf16 is compute only: the masters stay fp32
        (False, False, torch.float32),  # computes what an fp32 trained role computes
        (False, True, torch.bfloat16),  # keeps the checkpoint's 2 bytes per parameter
    ],
)
def test_role_weights_from_a_bf16_checkpoint(tmp_path, trained, bf16, expected):
    from realflow.data.tokenizer import load_tokenizer
    from realflow.experiments.common import ModelConfig, ModelRole
    from realflow.models.hf_io import save_hf
    from realflow.system.models import build_model, build_module

    random = build_module(ModelRole(ModelConfig(), "lm"), seed=0)
    save_hf(random, tmp_path / "ckpt", load_tokenizer("builtin"), dtype=torch.bfloat16)
    role = ModelRole(ModelConfig(path=str(tmp_path / "ckpt"), bf16=bf16), "lm")
    engine = build_model("r", role, trained, total_train_steps=2, seed=0).module
    assert {p.dtype for p in engine.module.parameters()} == {expected}
    if trained:
        assert engine.save_dtype == torch.bfloat16
