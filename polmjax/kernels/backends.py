"""The Pallas backend module of a kernel package, imported when a call first asks for it.

`polmjax.kernels.<kernel>.tpu` builds on `jax.experimental.pallas.tpu` (Mosaic) and `.gpu` on
`jax.experimental.pallas.triton`, which JAX 0.11 deprecates. Importing them lazily keeps polmjax importable
(and the XLA paths working) on a JAX without one of them; asking for that backend then says what is missing.
"""

from __future__ import annotations

import importlib

import jax

_MODULES = {"pallas_tpu": ("tpu", "jax.experimental.pallas.tpu"), "pallas_gpu": ("gpu", "jax.experimental.pallas.triton")}


def pallas_backend(package: str, impl: str):
    """`package`.tpu for impl="pallas_tpu", `package`.gpu for "pallas_gpu"."""
    module, needs = _MODULES[impl]
    try:
        return importlib.import_module(f"{package}.{module}")
    except ImportError as err:
        raise ImportError(f"impl={impl!r} needs {needs}, which jax {jax.__version__} does not provide ({err}); "
                          "use impl='xla'") from err
