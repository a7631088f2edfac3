#!/usr/bin/env bash
# GPU scale check (under a minute on an H100-class GPU): training steps/s and peak GPU memory of
# one rank reading from the slice store, 64 and 128 px, batch 128 and 256, with the in-RAM path
# beside it. See benchmarks/gpu_scale.py.
#   bash benchmarks/gpu_scale.sh                       # CUDA
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_scale.sh    # smoke test on a CPU, seconds
# Uses python3 (or $PYTHON) with the package importable (PYTHONPATH=src is set if empty).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD/src}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_scale.py "$@"
