"""Callbacks: run events in order, stopping the run (early stopping, a target metric), their
own files, failures with the user's traceback, and strict config checks."""

from __future__ import annotations

import json
from typing import Any

import pytest
from systest_utils import check_checkpoints_intact, metric_steps, toy_config

from realflow.api.callbacks import Callback, RunContext, callback_problems
from realflow.api.registry import CALLBACKS
from realflow.system import runner
from realflow.system.master import RunFailure
from realflow.system.toy_interfaces import ppo_like_nodes

pytestmark = pytest.mark.timeout(120)


class Recorder(Callback):
    """Records every event; writes its own file at the end."""

    events: list[tuple[Any, ...]] = []

    def __init__(self, fail_at_step: int = 0):
        self.fail_at_step = fail_at_step
        Recorder.events = []

    def on_run_start(self, ctx: RunContext) -> None:
        self.events.append(("start", ctx.experiment))

    def on_step_end(self, ctx: RunContext, step: int, metrics: dict[str, Any]) -> None:
        if step == self.fail_at_step:
            raise ZeroDivisionError("recorder gives up")
        self.events.append(("step", step, metrics["step"], metrics["calls"]))

    def on_save(self, ctx: RunContext, step: int, path: str) -> None:
        self.events.append(("save", step, path))

    def on_run_end(self, ctx: RunContext, result: Any) -> None:
        self.events.append(("end", result.last_step))
        with open(f"{ctx.output_dir}/recorder.json", "w") as f:
            json.dump(len(self.events), f)


@pytest.fixture
def recorder():
    CALLBACKS.register("test_recorder")(Recorder)
    yield Recorder
    CALLBACKS.unregister("test_recorder")


def test_events_arrive_in_order_with_the_step_metrics(tmp_path, recorder):
    cfg = toy_config(
        tmp_path, ppo_like_nodes(), total_steps=4, save_freq_steps=2, callbacks=["test_recorder"]
    )
    runner.run("toy", cfg)
    ckpt = str(tmp_path / "checkpoints")
    assert recorder.events == [
        ("start", "toy"),
        ("step", 1, 1, 1.0),
        ("step", 2, 2, 2.0),
        ("save", 2, f"{ckpt}/step_2"),
        ("step", 3, 3, 3.0),
        ("step", 4, 4, 4.0),
        ("save", 4, f"{ckpt}/step_4"),
        ("end", 4),
    ]
    assert json.loads((tmp_path / "recorder.json").read_text()) == 8


def test_target_metric_stops_the_run_and_saves(tmp_path):
    """`calls` of actor_train is 1, 2, 3... at steps 1, 2, 3 (the toy's counter): with window 2
    the mean first reaches 4.5 at step 5. Up to two steps are in flight when it asks."""
    cfg = toy_config(
        tmp_path,
        ppo_like_nodes(),
        total_steps=20,
        callbacks=["target_metric"],
        callback_args={"target_metric": {"metric": "calls", "value": 4.5, "window": 2}},
    )
    result = runner.run("toy", cfg)
    assert result.stop_reason.startswith("target_metric: calls (mean of 2 steps) reached 4.5")
    assert not result.interrupted
    assert result.last_step in (5, 6)
    assert metric_steps(str(tmp_path)) == list(range(1, result.last_step + 1))
    check_checkpoints_intact(str(tmp_path), expect_latest=result.last_step)


def test_early_stopping_after_patience_steps_without_improvement(tmp_path):
    """`n_seqs` is 4 at every step: the best is set at step 1 and never beaten, so with
    patience 3 the stop is asked at step 4."""
    cfg = toy_config(
        tmp_path,
        ppo_like_nodes(),
        total_steps=20,
        callbacks=["early_stopping"],
        callback_args={
            "early_stopping": {"metric": "n_seqs", "mode": "max", "patience": 3, "window": 1}
        },
    )
    result = runner.run("toy", cfg)
    assert "has not improved on 4 for 3 steps" in result.stop_reason
    assert result.last_step in (4, 5)


def test_a_failing_callback_stops_the_run_with_its_traceback(tmp_path, recorder):
    cfg = toy_config(
        tmp_path,
        ppo_like_nodes(),
        total_steps=5,
        callbacks=["test_recorder"],
        callback_args={"test_recorder": {"fail_at_step": 2}},
    )
    with pytest.raises(RunFailure, match="Recorder.on_step_end failed: ZeroDivisionError") as info:
        runner.run("toy", cfg)
    assert "test_callbacks.py" in info.value.traceback_text
    assert 'raise ZeroDivisionError("recorder gives up")' in info.value.traceback_text


def test_callback_config_problems_are_listed_together():
    problems = callback_problems(
        ["early_stop", "target_metric"],
        {"target_metric": {"valeu": 1.0}, "early_stopping": {"patience": 2}},
    )
    assert problems == [
        "callbacks: unknown callback 'early_stop'. Known: early_stopping, target_metric. "
        "Did you mean 'early_stopping'?",
        "callback_args.early_stopping: no callback 'early_stopping' in callbacks "
        "['early_stop', 'target_metric']; add it there",
        "callback_args.target_metric.valeu: unknown argument; did you mean 'value'?",
    ]
    bad_value = callback_problems(["early_stopping"], {"early_stopping": {"mode": "sideways"}})
    assert bad_value == [
        "callback_args.early_stopping: early_stopping mode 'sideways' must be 'min' or 'max'"
    ]


def test_callbacks_from_the_command_line(tmp_path):
    from realflow.api.config import apply_overrides
    from realflow.experiments.grpo import GRPOConfig

    cfg = apply_overrides(
        GRPOConfig,
        ["callbacks=[target_metric]", "callback_args.target_metric.value=0.6"],
    )
    assert cfg.callbacks == ["target_metric"]
    assert cfg.callback_args == {"target_metric": {"value": 0.6}}
