import math

import pytest

from realflow.engines import OptimizerConfig, lr_at, warmup_steps
from realflow.engines.schedule import lr_factor


def reference(step: int, total: int, lr: float, warm_prop: float, kind: str, r: float) -> float:
    w = int(warm_prop * total)
    if step < w:
        return lr * (step + 1) / w
    p = min(1.0, (step - w) / max(1, total - w))
    if kind == "constant":
        return lr
    if kind == "cosine":
        return lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)))
    return lr * (r + (1 - r) * (1 - p))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_schedule_matches_closed_form(kind, min_ratio):
    cfg = OptimizerConfig(
        lr=3e-4, lr_scheduler_type=kind, warmup_steps_proportion=0.1, min_lr_ratio=min_ratio
    )
    total = 100
    assert warmup_steps(cfg, total) == 10
    for step in [0, 1, 5, 9, 10, 11, 37, 50, 99, 100, 150]:
        expected = reference(step, total, 3e-4, 0.1, kind, min_ratio)
        assert lr_at(cfg, step, total) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_landmarks():
    cfg = OptimizerConfig(lr=1.0, warmup_steps_proportion=0.1, min_lr_ratio=0.2)
    assert lr_factor(cfg, 0, 100) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 100) == pytest.approx(1.0)  # warmup ends at the full lr
    assert lr_factor(cfg, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 55, 100) == pytest.approx(0.6)  # cosine midpoint: (1 + r) / 2
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.2)  # floor
    assert lr_factor(cfg, 500, 100) == pytest.approx(0.2)


def test_no_warmup():
    cfg = OptimizerConfig(lr=1.0, warmup_steps_proportion=0.0)
    assert lr_factor(cfg, 0, 10) == 1.0
