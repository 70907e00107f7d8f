"""Test setup: 8 fake CPU devices, offline hub, strict numpy rank promotion, float32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (TPU ahead-of-time compiles): several test processes may load it; no TPU host discovery on CPU
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# the CUDA plugin (GPU ahead-of-time compiles) logs at info level that this host has no GPU driver
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
