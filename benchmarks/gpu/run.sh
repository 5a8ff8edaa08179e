#!/usr/bin/env bash
# Every CUDA test, then the GPU benchmark of issue 9, on one GPU machine, in under 8 minutes.
#
#   make gpu-wheels                      # here, with a package index: wheels the GPU machine lacks
#   bash benchmarks/gpu/run.sh           # there, from anywhere; logs under $OUT (default ./gpu-out)
#   bash benchmarks/gpu/run.sh --dry     # any CPU machine: collects the CUDA tests and runs the
#                                        # benchmark's every case with tiny sizes (a smoke test)
#
# The machine needs python3 with torch (CUDA build) and transformers, pytest and networkx,
# safetensors, tokenizers, tqdm, tensorboard (the device image of this project has them all).
# It may lack ray, deepspeed and flash-attn (no CUDA test needs them; attention then uses torch's
# varlen_attn) and omegaconf (runs need it): omegaconf and its antlr4 runtime are installed from
# benchmarks/gpu/wheels (or $WHEELS) when that folder holds them, with no index. realflow itself
# is not installed: the repository goes on PYTHONPATH.
#
# Steps, each under its own timeout, each run whatever the previous one did:
#   1. pytest -m cuda (<= 180 s): tests/models/test_models_cuda.py first (attention kernels,
#      packed model vs HF, CUDA-graph decoding), then every other CUDA test;
#   2. bench_gpu.py (<= 290 s; starts no case after 230 s): JSON of figures, one case at a time.
# Writes to $OUT: env.txt, pip.log, pytest.log, pytest.xml, bench.log, bench_gpu.json.
# Exit status: 0 when every step passed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/gpu-out}"
WHEELS="${WHEELS:-$ROOT/benchmarks/gpu/wheels}"
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)

{ nvidia-smi || echo "nvidia-smi: none"; } >"$OUT/env.txt" 2>&1
"$PY" -c 'import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      "transformers", transformers.__version__)
from realflow.models.attention import flash_attn_available, torch_varlen_params
print("flash_attn", flash_attn_available(), "torch varlen_attn", torch_varlen_params())' \
  2>&1 | tee -a "$OUT/env.txt"

if ! "$PY" -c 'import omegaconf' 2>/dev/null && ls "$WHEELS"/omegaconf-*.whl >/dev/null 2>&1; then
  # Both are pure-Python wheels (make gpu-wheels builds antlr4's from its sdist).
  "$PY" -m pip install --no-index --find-links "$WHEELS" omegaconf antlr4-python3-runtime==4.9.3 \
    >"$OUT/pip.log" 2>&1 || echo "pip install failed" | tee -a "$OUT/pip.log"
fi
"$PY" -c 'import omegaconf; print("omegaconf", omegaconf.__version__)' >>"$OUT/pip.log" 2>&1 \
  || echo "omegaconf missing (make gpu-wheels): the run tests and the grpo_step case will fail" \
  | tee -a "$OUT/pip.log"

status=0
step() {  # step NAME TIMEOUT_S LOG COMMAND...: run, log, remember a failure, go on
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (at $(($(date +%s) - START)) s, limit $limit s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "$name: exit $rc"; status=1; }
}

PYTEST=("$PY" -m pytest -m cuda -p no:cacheprovider -q -rA --durations=15 --junitxml="$OUT/pytest.xml")
BENCH=("$PY" benchmarks/gpu/bench_gpu.py --out "$OUT" --budget-s 230)
if [ "$DRY" = 1 ]; then
  PYTEST+=(--collect-only)
  BENCH+=(--dry)
fi
step "pytest -m cuda" 180 pytest.log "${PYTEST[@]}" tests/models/test_models_cuda.py tests
step "bench_gpu.py" 290 bench.log "${BENCH[@]}"

echo "run.sh: exit $status after $(($(date +%s) - START)) s (logs in $OUT)"
exit $status
