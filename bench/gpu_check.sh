#!/usr/bin/env bash
# On a GPU machine: the CUDA tests, then the GPU benchmark, in one command.
#   bash bench/gpu_check.sh [gpu_bench.py options, e.g. --quick or --batch 512]
# Results go to bench/results/gpu_bench.{json,csv}; the script fails if either step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu_check.sh: no CUDA device (torch.cuda.is_available() is False)")
import lavae_fast
from lavae_fast import _backends
print("device:", torch.cuda.get_device_name(), "|", _backends.describe())
if not _backends.triton_kernels_loaded:
    sys.exit("bench/gpu_check.sh: the Triton kernels did not register: " + str(_backends.triton_kernels_error))
PY
python -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider
python bench/gpu_bench.py "$@"
