"""Helpers for end-to-end runs: tiny configs, the run directory's files, saved weights, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from realflow.api.config import apply_overrides
from realflow.api.registry import EXPERIMENTS
from realflow.experiments.common import ExperimentConfig

REPO = Path(__file__).resolve().parents[2]
PPO_MINILM = "experiments/ppo_external_scorer.py"
REMAX = "experiments/remax.py"
DPO_LORA = "experiments/dpo_lora.yaml"
DPO_LORA_PLUGINS = "experiments/dpo_lora_plugins.py"
QUIET = ("tensorboard=false", "progress_bar=false")


def tiny_config(
    exp: str, output_dir: str | Path, *overrides: str, cls: type | None = None
) -> ExperimentConfig:
    """`exp` (built as `cls` when given) with its shipped tiny preset (when there is one), quiet,
    writing to `output_dir`."""
    preset = REPO / "configs" / f"{exp}_tiny.yaml"
    presets = [str(preset)] if preset.is_file() else []
    return apply_overrides(
        cls or EXPERIMENTS.get(exp), [f"output_dir={output_dir}", *QUIET, *overrides], presets
    )


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_finite_rows(rows: Sequence[dict[str, Any]]) -> None:
    for row in rows:
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"step {row['step']}: non-finite metrics {bad}"


def trace_calls(output_dir: str | Path) -> list[tuple[str, int]]:
    """(MFC name, step) of every call event in trace.json (checkpoint saves left out)."""
    with open(os.path.join(output_dir, "trace.json")) as f:
        events = json.load(f)["traceEvents"]
    return [
        (e["name"], e["args"]["step"])
        for e in events
        if e["ph"] == "X" and not e["name"].startswith("save step_")
    ]


def assert_one_trace_event_per_call(output_dir: str | Path, mfcs: Sequence[str], steps: int):
    calls = trace_calls(output_dir)
    expected = [(m, s) for s in range(1, steps + 1) for m in mfcs]
    assert sorted(calls) == sorted(expected)


def safetensors_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of an HF directory, by HF name."""
    from safetensors.torch import load_file

    found: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            found.update(load_file(os.path.join(hf_dir, name)))
    assert found, f"no safetensors in {hf_dir}"
    return found


def initial_state(cfg: ExperimentConfig, role: str) -> dict[str, torch.Tensor]:
    """The weights `role` starts a run of `cfg` with, built the way the worker builds them."""
    from realflow.system.builtin_models import resolve_builtin_models
    from realflow.system.models import build_module

    module = build_module(resolve_builtin_models(cfg).roles()[role], cfg.seed)
    assert module is not None
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def saved_state(hf_dir: str | Path, head: str) -> dict[str, torch.Tensor]:
    """A saved HF directory as realflow loads it (realflow parameter names)."""
    from realflow.models.hf_io import load_hf

    model = load_hf(str(hf_dir), head=head, load_tokenizer=False).model
    return {k: v.detach() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ; the two must hold the same names and shapes."""
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].shape == after[k].shape, k
    return [k for k in before if not torch.equal(before[k], after[k])]


def run_cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m realflow.quickstart *args` in a fresh interpreter (the built-in model cache and
    the offline HF settings of the test session are inherited through the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "realflow.quickstart", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def check_cli(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc.stdout
