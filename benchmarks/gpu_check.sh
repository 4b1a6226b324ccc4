#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): CUDA tests, bf16 / SDPA accuracy, base-model speed and
# MFU, one table. On a machine without a GPU it says so and exits 0.
#   bash benchmarks/gpu_check.sh [--quick] [--no-tests]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi
exec "$py" benchmarks/gpu_check.py "$@"
