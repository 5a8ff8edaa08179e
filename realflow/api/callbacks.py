"""Callbacks: your code, run in the driver on the events of a run.

A callback is a class registered in `CALLBACKS` and named in the config; its keyword arguments
come from `callback_args.<name>.*`:

    python -m realflow.quickstart grpo callbacks=[target_metric] \\
        callback_args.target_metric.metric=reward/mean callback_args.target_metric.value=0.6

    @CALLBACKS.register("my_callback")
    class MyCallback(Callback):
        def __init__(self, every: int = 10): ...
        def on_step_end(self, ctx, step, metrics):
            if metrics["loss"] > 100:
                ctx.request_stop("loss diverged")

Events, in order: `on_run_start(ctx)`; per step `on_step_end(ctx, step, metrics)` with the
step's metrics row (the same keys as metrics.jsonl); `on_evaluate(ctx, step, metrics)` with the
`eval/...` row when an evaluation ran; `on_save(ctx, step, path)` after a checkpoint is written;
`on_run_end(ctx, result)`. `ctx.request_stop(reason)` ends the run like a stop signal does: the
steps in flight finish and the last one is saved; the run then ends normally (exit 0).
Callbacks may write their own files under `ctx.output_dir`. An exception in a callback stops the
run with its traceback (a callback is user code: its failure must not pass silently).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import math
from typing import Any

from realflow.api.registry import CALLBACKS, closest

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunContext:
    """What a callback sees of the run."""

    experiment: str
    config: Any  # the resolved ExperimentConfig
    output_dir: str
    stop_reason: str = ""

    def request_stop(self, reason: str) -> None:
        """End the run after the steps in flight (their last one is saved)."""
        if not self.stop_reason:
            self.stop_reason = reason
            logger.info("a callback asked to stop: %s", reason)

    @property
    def stop_requested(self) -> bool:
        return bool(self.stop_reason)


class Callback:
    """Base class: override the events you need (every one is a no-op here)."""

    def on_run_start(self, ctx: RunContext) -> None:
        pass

    def on_step_end(self, ctx: RunContext, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_evaluate(self, ctx: RunContext, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_save(self, ctx: RunContext, step: int, path: str) -> None:
        pass

    def on_run_end(self, ctx: RunContext, result: Any) -> None:
        pass


def build_callbacks(names: list[str], args: dict[str, dict[str, Any]]) -> list[Callback]:
    """The callbacks named in the config, built with their `callback_args`; raises ValueError
    listing every unknown name or argument."""
    problems = callback_problems(names, args)
    if problems:
        raise ValueError("; ".join(problems))
    return [CALLBACKS.get(n)(**dict(args.get(n, {}))) for n in names]


def callback_problems(names: list[str], args: dict[str, dict[str, Any]]) -> list[str]:
    """Every problem with the callback names and arguments (for config validation)."""
    problems = [f"callbacks: {CALLBACKS.miss_message(n)}" for n in names if n not in CALLBACKS]
    for name in sorted(set(args) - set(names)):
        problems.append(
            f"callback_args.{name}: no callback '{name}' in callbacks {names}; add it there"
        )
    for name in names:
        if name not in CALLBACKS or name not in args:
            continue
        params = inspect.signature(CALLBACKS.get(name)).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            continue
        for key in sorted(set(args[name]) - set(params)):
            guess = closest(key, list(params))
            hint = f"; did you mean '{guess}'?" if guess else f"; known: {', '.join(params)}"
            problems.append(f"callback_args.{name}.{key}: unknown argument{hint}")
    if problems:
        return problems
    for name in names:
        try:
            CALLBACKS.get(name)(**dict(args.get(name, {})))
        except (TypeError, ValueError) as e:
            problems.append(f"callback_args.{name}: {e}")
    return problems


class CallbackError(RuntimeError):
    """A callback raised; `traceback_text` holds its traceback."""

    def __init__(self, message: str, traceback_text: str):
        super().__init__(message)
        self.traceback_text = traceback_text


class CallbackList:
    """Runs every callback for each event, in the configured order; a callback that raises
    becomes a CallbackError naming it and the event."""

    def __init__(self, callbacks: list[Callback], ctx: RunContext):
        self.callbacks = callbacks
        self.ctx = ctx

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            try:
                getattr(cb, event)(self.ctx, *args)
            except Exception as e:
                from realflow.api.tracebacks import format_exception

                raise CallbackError(
                    f"callback {type(cb).__name__}.{event} failed: {type(e).__name__}: {e}",
                    format_exception(e),
                ) from e

    def run_start(self) -> None:
        self._emit("on_run_start")

    def step_end(self, step: int, metrics: dict[str, Any]) -> None:
        self._emit("on_step_end", step, metrics)

    def evaluate(self, step: int, metrics: dict[str, Any]) -> None:
        self._emit("on_evaluate", step, metrics)

    def save(self, step: int, path: str) -> None:
        self._emit("on_save", step, path)

    def run_end(self, result: Any) -> None:
        self._emit("on_run_end", result)


# ---- built-in callbacks ------------------------------------------------------------------------


class _Windowed(Callback):
    """The mean of `metric` over the last `window` rows that have it."""

    def __init__(self, metric: str, window: int):
        if window < 1:
            raise ValueError(f"window ({window}) must be >= 1")
        self.metric = metric
        self.values: collections.deque[float] = collections.deque(maxlen=window)
        self.missing_warned = False

    def _observe(self, metrics: dict[str, Any]) -> float | None:
        value = metrics.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            if not self.missing_warned:
                logger.warning(
                    "%s: metric %r is not in the step's metrics (have: %s)",
                    type(self).__name__,
                    self.metric,
                    ", ".join(sorted(metrics)[:20]),
                )
                self.missing_warned = True
            return None
        self.values.append(float(value))
        if len(self.values) < (self.values.maxlen or 1):
            return None
        return sum(self.values) / len(self.values)


@CALLBACKS.register("early_stopping")
class EarlyStopping(_Windowed):
    """Stop when the windowed mean of `metric` has not improved by `min_delta` for `patience`
    steps (`mode`: 'min' for losses, 'max' for rewards)."""

    def __init__(
        self,
        metric: str = "loss",
        mode: str = "min",
        patience: int = 50,
        min_delta: float = 0.0,
        window: int = 10,
    ):
        super().__init__(metric, window)
        if mode not in ("min", "max"):
            raise ValueError(f"early_stopping mode {mode!r} must be 'min' or 'max'")
        if patience < 1:
            raise ValueError(f"early_stopping patience ({patience}) must be >= 1")
        self.sign = 1.0 if mode == "max" else -1.0
        self.patience = patience
        self.min_delta = min_delta
        self.best = -math.inf
        self.since_best = 0

    def on_step_end(self, ctx: RunContext, step: int, metrics: dict[str, Any]) -> None:
        mean = self._observe(metrics)
        if mean is None:
            return
        if self.sign * mean > self.best + self.min_delta:
            self.best = self.sign * mean
            self.since_best = 0
            return
        self.since_best += 1
        if self.since_best >= self.patience:
            ctx.request_stop(
                f"early_stopping: {self.metric} (mean of {len(self.values)} steps) has not "
                f"improved on {self.sign * self.best:.4g} for {self.patience} steps"
            )


@CALLBACKS.register("target_metric")
class TargetMetric(_Windowed):
    """Stop once the windowed mean of `metric` reaches `value` (`mode` 'max': >= value;
    'min': <= value)."""

    def __init__(
        self, metric: str = "reward/mean", value: float = 1.0, mode: str = "max", window: int = 10
    ):
        super().__init__(metric, window)
        if mode not in ("min", "max"):
            raise ValueError(f"target_metric mode {mode!r} must be 'min' or 'max'")
        self.value = value
        self.mode = mode

    def on_step_end(self, ctx: RunContext, step: int, metrics: dict[str, Any]) -> None:
        mean = self._observe(metrics)
        if mean is None:
            return
        if (mean >= self.value) if self.mode == "max" else (mean <= self.value):
            ctx.request_stop(
                f"target_metric: {self.metric} (mean of {len(self.values)} steps) reached "
                f"{mean:.4g} (target {self.value:g}) at step {step}"
            )
