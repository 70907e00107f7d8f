"""Compile-only devices for the ahead-of-time tests: skip (not fail) where the compiler is not installed."""

import functools

import numpy as np
import pytest

from polmjax import aot


@functools.cache
def _cached(target: str):
    try:
        return np.array(aot.devices(target))
    except RuntimeError as err:
        return err


def target_devices(target: str) -> np.ndarray:
    """np.array of the compile-only devices of `target` ("v5e:2x2", "h100:2", ...), or skip the test."""
    devices = _cached(target)
    if isinstance(devices, Exception):
        pytest.skip(str(devices))
    return devices
