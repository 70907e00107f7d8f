"""The kernel benchmark's shapes compiled for NVIDIA GPUs from a CPU host: memory and kernel resources.

No GPU runs here, so nothing is timed. For each target (A100, H100, H200 by default) and each shape of
`kernels.py` (attention: bf16, causal, B*T = 16384, GQA 4:1, head dim 64/128; log-probs: N=16384,
D=2048, V=131072 bf16), forward + backward is compiled with the real XLA:GPU + Triton compilers and the
script prints the temporary memory XLA reserves (`memory_analysis()`), ours vs the XLA reference, cuDNN
and the naive log-prob path, and each Pallas kernel's grid, shared memory, registers, spills and resident
blocks per SM (`polmjax.aot.compile_with_kernels`, ptxas on the PTX).

    pip install -e ".[gpu-aot]"
    JAX_PLATFORMS=cpu python experiments/benchmarks/kernels_gpu_aot.py [--targets h100 a100] [--seq-len 8192]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from polmjax import aot  # noqa: E402
from polmjax.kernels.attention.ops import BlockSizes, attention  # noqa: E402
from polmjax.kernels.logprobs import token_logprobs_naive  # noqa: E402
from polmjax.kernels.logprobs.ops import token_logprobs  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["a100", "h100", "h200"], choices=sorted(aot.GPUS))
    p.add_argument("--seq-len", type=int, default=8192, help="attention T (B = 16384 / T)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    args = p.parse_args(argv)
    for target in args.targets:
        device = aot.devices(target)[0]
        print(f"== {target}: {device.device_kind}")
        for K in args.head_dims:
            _attention(target, device, args.seq_len, K)
        _logprobs(target, device)


def _on(device, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))


def _temp_mib(compile_):
    try:
        return f"{compile_().memory_analysis().temp_size_in_bytes / 2**20:9.1f} MiB"
    except Exception as err:  # e.g. cuDNN's version check needs the cuDNN library (jax[cuda12])
        return f"unavailable ({type(err).__name__}: {str(err)[:60]})"


def _attention(target, device, T, K):
    B, H = 16384 // T, 2048 // K
    q, kv = _on(device, (B, T, H, K), jnp.bfloat16), _on(device, (B, T, H // 4, K), jnp.bfloat16)
    blocks = BlockSizes.default("pallas_gpu", head_dim=K, device_kind=device.device_kind)
    print(f"attention fwd+bwd, B={B} T={T} H={H} G={H // 4} K={K}, {blocks}")

    def lowered(impl, **kw):
        loss = lambda q, k, v: attention(q, k, v, impl=impl, **kw).astype(jnp.float32).sum()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv)

    ours, kernels = aot.compile_with_kernels(lowered("pallas_gpu", block_sizes=blocks), target)
    for impl in ("pallas_gpu", "xla", "cudnn"):
        print(f"  temp {impl:<10} {_temp_mib(lambda: ours if impl == 'pallas_gpu' else lowered(impl).compile())}")
    for k in kernels:
        print("  " + k.row())


def _logprobs(target, device):
    N, D, V = 16384, 2048, 131072
    args = (_on(device, (N, D), jnp.bfloat16), _on(device, (D, V), jnp.bfloat16), _on(device, (N,), jnp.int32))
    print(f"token_logprobs loss+grad, N={N} D={D} V={V} bf16")

    def lowered(fn, **kw):
        loss = lambda h, w, t: fn(h, w, t, **kw).sum()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args)

    ours, kernels = aot.compile_with_kernels(lowered(token_logprobs, impl="pallas_gpu"), target)
    for name, compile_ in (("pallas_gpu", lambda: ours),
                           ("xla", lambda: lowered(token_logprobs, impl="xla").compile()),
                           ("naive", lambda: lowered(token_logprobs_naive).compile())):
        print(f"  temp {name:<10} {_temp_mib(compile_)}")
    for k in kernels:
        print("  " + k.row())


if __name__ == "__main__":
    main()
