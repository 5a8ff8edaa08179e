"""benchmarks/gpu/bench_gpu.py --dry: every case of the GPU benchmark runs its code on CPU with
tiny sizes (the device machine's one run must not be the first), and the JSON it writes holds
each case's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_of_every_case(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/gpu/bench_gpu.py"),
        "--dry",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "bench_gpu.json").read_text())
    cases = res["cases"]
    assert list(cases) == ["attention", "train", "generate", "generate_eos", "offload", "grpo_step"]
    assert not [name for name, r in cases.items() if "error" in r or "skipped" in r]
    assert {"sdpa_bucketed", "sdpa_varlen"} <= set(cases["attention"])
    train = cases["train"]
    assert train["padded_tokens"] > train["real_tokens"] > 0
    assert train["realflow"]["seconds"] > 0 and train["hf_sdpa_padded"]["seconds"] > 0
    sides = {"realflow_static", "realflow_static_fp32_autocast", "realflow_eager", "hf_top_k50"}
    assert sides <= set(cases["generate"])
    assert cases["generate_eos"]["realflow_static"]["tokens"] > 0
    assert set(cases["offload"]) >= {"trained", "inference"}
    grpo = cases["grpo_step"]
    assert len(grpo["step_s"]) == 1 and {"actor_gen", "actor_train"} <= set(grpo["mfc_s_last_step"])
    assert "| train | realflow |" in proc.stdout  # the table


def test_a_failing_side_is_recorded_and_the_others_still_run():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks/gpu/bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = bench  # its dataclass looks its module up
    spec.loader.exec_module(bench)
    ran = []

    def fails():
        raise RuntimeError("no kernel")

    out = bench.compare({"a": fails, "b": lambda: ran.append(1)}, reps=2, n_tokens=10)
    assert out["a"] == {"error": "RuntimeError: no kernel"}
    assert out["b"]["seconds"] >= 0 and len(ran) == 3  # warm-up + 2 reps
    assert bench.ratio(out, "a", "b") is None
