"""What the Pallas backends of the kernel packages share: lazy import, and the GPU matmul precision.

`pallas_backend` returns the backend module of a kernel package, imported when a call first asks for it.

`polmjax.kernels.<kernel>.tpu` builds on `jax.experimental.pallas.tpu` (Mosaic) and `.gpu` on
`jax.experimental.pallas.triton`, which JAX 0.11 deprecates. Importing them lazily keeps polmjax importable
(and the XLA paths working) on a JAX without one of them; asking for that backend then says what is missing.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

_MODULES = {"pallas_tpu": ("tpu", "jax.experimental.pallas.tpu"), "pallas_gpu": ("gpu", "jax.experimental.pallas.triton")}


def pallas_backend(package: str, impl: str):
    """`package`.tpu for impl="pallas_tpu", `package`.gpu for "pallas_gpu"."""
    module, needs = _MODULES[impl]
    try:
        return importlib.import_module(f"{package}.{module}")
    except ImportError as err:
        raise ImportError(f"impl={impl!r} needs {needs}, which jax {jax.__version__} does not provide ({err}); "
                          "use impl='xla'") from err


def triton_dot_precision(dtype, interpret: bool):
    """Precision of a matmul in a Triton kernel: float32 inputs get 3xTF32 on the GPU (tensor cores at
    about float32 accuracy; IEEE float32 Triton dots spill 0.6-164 KiB of registers per kernel, per
    ptxas, and default TF32 is too coarse for float32 training); the interpreter (CPU) has no 3xTF32 and
    gets HIGHEST. Lower-precision inputs need no flag (None)."""
    if dtype != jnp.float32:
        return None
    return jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
