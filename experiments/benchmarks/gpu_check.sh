#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (jax with CUDA preinstalled there), < 10 minutes:
# the Pallas GPU kernels compiled and run against the references, the kernel benchmarks (vs XLA and
# cuDNN), and the SFT step of a Qwen3-0.6B-shaped model with each kernel choice (tokens/s, MFU).
#   bash experiments/benchmarks/gpu_check.sh [OUT_DIR]      (the device tool: OUT_DIR=$OUT, carry .whl)
# The device image (Python 3.12, jax with CUDA, flax, optax, orbax, transformers) lacks grain, which the SFT
# benchmark imports; fetch its wheels here first (.whl/ is in .git/info/exclude):
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl grain array_record portpicker
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.txt"
# kernels on the real GPU vs the XLA references (outputs and gradients, bf16 and fp32)
timeout 180 python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_kernels_on_gpu.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
timeout 200 python3 experiments/benchmarks/kernels.py 2>&1 | tee "$OUT/kernels.txt"
timeout 180 python3 experiments/benchmarks/sft_mfu.py --steps 3 --warmup 1 \
  --pairs xla:xla pallas_gpu:pallas_gpu cudnn:pallas_gpu 2>&1 | tee "$OUT/sft_mfu.txt"
