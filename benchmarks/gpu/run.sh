#!/usr/bin/env bash
# Every CUDA test and the GPU benchmark, on one GPU machine, in under 8 minutes.
#
#   make gpu-wheels                      # here, with internet: wheels the GPU machine lacks
#   bash benchmarks/gpu/run.sh           # there, from anywhere; logs under $OUT (default ./gpu-out)
#
# The machine needs python3 with torch (CUDA build) and transformers, pytest and networkx,
# safetensors, tokenizers, tqdm, tensorboard (the device image of this project has them all).
# It may lack ray, deepspeed and flash-attn (no CUDA test needs them) and omegaconf (the run
# tests need it): omegaconf and its antlr4 runtime are installed from benchmarks/gpu/wheels
# (or $WHEELS) when that folder holds them, with no index. realflow itself is not installed:
# the repository goes on PYTHONPATH.
#
# Writes to $OUT: nvidia-smi.txt, pip.log, pytest.log, pytest.xml, bench.log, bench_gpu.json.
# Exit status: 0 when the tests and the benchmark both passed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/gpu-out}"
WHEELS="${WHEELS:-$ROOT/benchmarks/gpu/wheels}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$OUT/nvidia-smi.txt"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "gpus", torch.cuda.device_count(), "transformers", transformers.__version__)' \
  | tee -a "$OUT/nvidia-smi.txt"

if ls "$WHEELS"/omegaconf-*.whl >/dev/null 2>&1; then
  # Both are pure-Python wheels (make gpu-wheels builds antlr4's from its sdist).
  "$PY" -m pip install --no-index --find-links "$WHEELS" omegaconf antlr4-python3-runtime==4.9.3 \
    >"$OUT/pip.log" 2>&1 || echo "pip install failed" | tee -a "$OUT/pip.log"
else
  echo "no wheels in $WHEELS (make gpu-wheels); omegaconf:" >"$OUT/pip.log"
fi
"$PY" -c 'import omegaconf; print("omegaconf", omegaconf.__version__)' >>"$OUT/pip.log" 2>&1 \
  || echo "omegaconf missing: the CUDA run tests will fail" | tee -a "$OUT/pip.log"

status=0
echo "== pytest -m cuda"
timeout 270 "$PY" -m pytest -m cuda -p no:cacheprovider -q -rA --junitxml="$OUT/pytest.xml" tests \
  2>&1 | tee "$OUT/pytest.log" || status=1

echo "== benchmarks/gpu/bench_gpu.py"
timeout 180 "$PY" benchmarks/gpu/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1

echo "run.sh: exit $status (logs in $OUT)"
exit $status
