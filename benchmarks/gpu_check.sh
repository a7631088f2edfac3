#!/usr/bin/env bash
# GPU check (about a minute on an H100-class GPU): seconds per BraTS-size volume on CUDA at the
# default settings, the batch-32 reference on the same GPU, and torch.compile if it compiles in
# time. See benchmarks/gpu_check.py for the rows; docs/benchmarks.md for the results.
#   bash benchmarks/gpu_check.sh                      # CUDA
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # smoke test on a CPU, seconds
# Uses python3 (or $PYTHON) with the package importable (PYTHONPATH=src is set if empty).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-$PWD/src}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
