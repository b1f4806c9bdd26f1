#!/usr/bin/env bash
# One GPU session's speed figures in at most 8 minutes (benchmarks/gpu.py says what it measures):
#   benchmarks/gpu.sh                          # CUDA: writes gpu-figures.json
#   benchmarks/gpu.sh --out /path/figures.json
#   benchmarks/gpu.sh --device cpu --tiny      # a few images on CPU: checks the script runs
# Parts are written to the JSON as they finish; the hard limit stops a part that overruns
# (its figures are lost, the earlier parts' are kept). Exit status 1: a numerics check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
exec timeout --signal=INT --kill-after=20 "${GPU_BENCH_LIMIT_S:-480}" \
    "$PYTHON" benchmarks/gpu.py "$@"
