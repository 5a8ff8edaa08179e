import pytest

from realflow.api.config import validate
from realflow.engines import EngineConfig, OptimizerConfig


def test_defaults_are_valid():
    assert OptimizerConfig().validate() == []
    assert EngineConfig().validate() == []
    assert validate(OptimizerConfig()) == [] and validate(EngineConfig()) == []


def test_optimizer_messages_name_field_and_value():
    cfg = OptimizerConfig(
        lr=-1.0,
        weight_decay=-0.1,
        beta1=1.0,
        beta2=-0.5,
        eps=0.0,
        lr_scheduler_type="cosin",
        warmup_steps_proportion=1.5,
        min_lr_ratio=2.0,
        gradient_clipping=-1.0,
    )
    errors = cfg.validate()
    assert "lr (-1.0) must be positive" in errors
    assert "weight_decay (-0.1) must be >= 0" in errors
    assert "beta1 (1.0) must be in [0, 1)" in errors
    assert "beta2 (-0.5) must be in [0, 1)" in errors
    assert "eps (0.0) must be positive" in errors
    assert (
        "lr_scheduler_type 'cosin' unknown; known: constant, cosine, linear "
        "(did you mean 'cosine'?)" in errors
    )
    assert "warmup_steps_proportion (1.5) must be in [0, 1]" in errors
    assert "min_lr_ratio (2.0) must be in [0, 1]" in errors
    assert any(e.startswith("gradient_clipping (-1.0) must be >= 0") for e in errors)
    assert len(errors) == 9


def test_nan_lr_is_an_error():
    assert OptimizerConfig(lr=float("nan")).validate() == ["lr (nan) must be positive"]


def test_engine_messages():
    errors = EngineConfig(backend="deepspeeed", zero_stage=4).validate()
    assert errors == [
        "backend 'deepspeeed' unknown; known: torch, deepspeed (did you mean 'deepspeed'?)",
        "zero_stage (4) must be 0, 1, 2 or 3",
    ]
    assert EngineConfig(backend="jax").validate() == [
        "backend 'jax' unknown; known: torch, deepspeed"
    ]
    assert EngineConfig(zero_stage=True).validate() == ["zero_stage (True) must be 0, 1, 2 or 3"]


def test_config_layer_prefixes_paths():
    problems = validate(EngineConfig(zero_stage=5), prefix="actor.engine.")
    assert problems == ["actor.engine.zero_stage (5) must be 0, 1, 2 or 3"]


def test_importing_engines_is_cheap():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "import realflow.engines, realflow.engines.config, realflow.engines.schedule\n"
        "print([m for m in ('torch', 'deepspeed') if m in sys.modules])\n"
        "from realflow.engines import build_train_engine\n"
        "print([m for m in ('torch', 'deepspeed') if m in sys.modules])\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    assert out.stdout.split("\n")[:2] == ["[]", "['torch']"], out.stdout + out.stderr


def test_role_precision_and_offload_keys_are_checked_before_a_run():
    """`<role>.save_dtype` is strict and documented; offload on deepspeed is refused up front."""
    from realflow.api.config import ConfigError, apply_overrides, describe_fields
    from realflow.experiments.sft import SFTConfig

    cfg = apply_overrides(SFTConfig, ["actor.save_dtype=bfloat16", "actor.offload=true"])
    assert cfg.actor.engine_config().save_dtype == "bfloat16"
    with pytest.raises(ConfigError) as err:
        apply_overrides(
            SFTConfig, ["actor.save_dtype=bf16", "actor.backend=deepspeed", "actor.offload=true"]
        )
    problems = err.value.problems
    assert any(
        p.startswith("actor.save_dtype: 'bf16' is not one of 'auto', 'float32', 'bfloat16'")
        for p in problems
    ), problems
    assert any(
        p.startswith("actor.offload (true) is not supported with backend 'deepspeed'")
        for p in problems
    ), problems
    assert "actor.save_dtype" in describe_fields(SFTConfig)
