#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (jax with CUDA preinstalled there), ~10 minutes:
# the Pallas GPU kernels compiled and run against the references, the kernel benchmarks (vs XLA and
# cuDNN), and the SFT step of a Qwen3-0.6B-shaped model with each kernel choice (tokens/s, MFU).
#   bash experiments/benchmarks/gpu_check.sh [OUT_DIR]      (the device tool: OUT_DIR=$OUT)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
pip install -q --no-deps -e . 2>/dev/null || true
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.txt"
# kernels on the real GPU vs the XLA references (outputs and gradients, bf16 and fp32)
timeout 300 python -m pytest -q -p no:cacheprovider tests/test_kernels_on_gpu.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
timeout 300 python experiments/benchmarks/kernels.py 2>&1 | tee "$OUT/kernels.txt"
timeout 240 python experiments/benchmarks/sft_mfu.py --steps 5 2>&1 | tee "$OUT/sft_mfu.txt"
