"""Timing for benchmarks: median wall time of a jitted call after warm-up, waiting for the device."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(fn, args, warmup: int = 2, iters: int = 10) -> float:
    """Median milliseconds of `fn(*args)` over `iters` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
