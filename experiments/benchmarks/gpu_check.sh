#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (jax with CUDA preinstalled there):
# Pallas GPU kernels vs reference on real hardware, the kernel benchmarks (vs XLA and cuDNN), SFT MFU.
set -uo pipefail
cd "$(dirname "$0")/../.."
pip install -q --no-deps -e . 2>/dev/null || true
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
python -c "import jax; print(jax.__version__, jax.devices())"
# kernel tests against the references, compiled for the real GPU (interpret=False where the tests allow)
timeout 240 python -m pytest -q -x tests/test_attention_kernels.py tests/test_logprobs.py -k "not tpu" 2>&1 | tail -5
timeout 300 python experiments/benchmarks/kernels.py
timeout 180 python experiments/benchmarks/sft_throughput.py --only polmjax 2>&1 | tail -15
