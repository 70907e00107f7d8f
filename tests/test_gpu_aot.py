"""The Pallas GPU (Triton) kernels on the real GPU compiler, from this CPU host (no GPU needed).

`polmjax.aot.devices("h100")` gives compile-only CUDA devices; `jax.jit(...).lower(...).compile()` then
runs XLA:GPU, lowers each Pallas kernel through Triton to PTX for sm_80 / sm_90a and rejects what a GPU
would reject (shared-memory overflow, Triton lowering errors that interpret mode never sees). ptxas on
the PTX gives registers and spills. Shapes are the benchmark's (B*T = 16k, head dim 64/128/256; log-probs
N=16384, D=2048, V=131072), bf16, forward and backward.
"""

import os

import jax
import jax.numpy as jnp
import pytest
from aot_targets import target_devices
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from polmjax import aot
from polmjax.kernels.attention.ops import BlockSizes, attention, attention_sharded
from polmjax.kernels.logprobs import token_logprobs_naive, token_logprobs_sharded
from polmjax.kernels.logprobs.ops import token_logprobs

pytestmark = pytest.mark.gpu_aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _on(device, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(device))


def _attention_grad(impl, **options):
    def loss(q, k, v):
        return attention(q, k, v, impl=impl, **options).astype(jnp.float32).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _check_resources(kernels, expected):
    names = {k.name for k in kernels}
    assert names == set(expected), names
    for k in kernels:
        print(k.row())
        assert k.shared_memory <= aot.GPUS["h100"].shared_memory_per_block_optin
        if k.spill_bytes is not None:  # ptxas present
            assert k.blocks_per_sm >= 1


@pytest.mark.parametrize("gpu", ["h100", "a100"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_flash_attention_compiles_for_gpu(gpu, head_dim):
    """Forward + backward (dq, dk/dv kernels), causal GQA 16/4 heads, B*T = 2 x 8192."""
    device = target_devices(gpu)[0]
    q = _on(device, (2, 8192, 16, head_dim), jnp.bfloat16)
    kv = _on(device, (2, 8192, 4, head_dim), jnp.bfloat16)
    # the defaults a real GPU of this kind picks (here the default device is the CPU)
    blocks = BlockSizes.default("pallas_gpu", head_dim=head_dim, device_kind=device.device_kind)
    _, kernels = aot.compile_with_kernels(_attention_grad("pallas_gpu", block_sizes=blocks).lower(q, kv, kv), gpu)
    _check_resources(kernels, ["polmjax_flash_fwd", "polmjax_flash_dq", "polmjax_flash_dkv"])
    assert all(k.spill_bytes in (0, None) for k in kernels)  # the default tiles fit registers


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_flash_attention_float32_compiles_for_h100(head_dim):
    """float32 inputs: 3xTF32 dots on 32 x 32 tiles fit shared memory (IEEE float32 dots or larger tiles
    overflow it at head dim 128 / 256). The kernels sit at the register limit (see BlockSizes.for_gpu)."""
    device = target_devices("h100")[0]
    q = _on(device, (2, 2048, 8, head_dim), jnp.float32)
    kv = _on(device, (2, 2048, 2, head_dim), jnp.float32)
    blocks = BlockSizes.default("pallas_gpu", head_dim=head_dim, device_kind=device.device_kind, dtype=jnp.float32)
    _, kernels = aot.compile_with_kernels(_attention_grad("pallas_gpu", block_sizes=blocks).lower(q, kv, kv), "h100")
    _check_resources(kernels, ["polmjax_flash_fwd", "polmjax_flash_dq", "polmjax_flash_dkv"])


def test_flash_attention_all_options_compile_for_h100():
    """Packed segments, sliding window, soft-cap, odd length (padded inside) and a traced q_offset."""
    device = target_devices("h100")[0]
    q = _on(device, (3, 1000, 8, 128), jnp.bfloat16)
    kv = _on(device, (3, 1000, 2, 128), jnp.bfloat16)
    seg = _on(device, (3, 1000), jnp.int32)

    def loss(q, k, v, seg, offset):
        out = attention(q, k, v, segment_ids=seg, window=256, softcap=50.0, q_offset=offset, impl="pallas_gpu")
        return out.astype(jnp.float32).sum()

    offset = _on(device, (), jnp.int32)
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg, offset).compile()


def test_flash_attention_memory_on_h100():
    """The flash train step (forward + backward) needs a fraction of the XLA reference's temporaries."""
    device = target_devices("h100")[0]
    q = _on(device, (2, 8192, 16, 128), jnp.bfloat16)
    kv = _on(device, (2, 8192, 4, 128), jnp.bfloat16)
    temp = {impl: _attention_grad(impl).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
            for impl in ("pallas_gpu", "xla")}
    print({k: f"{v / 2**20:.1f} MiB" for k, v in temp.items()})
    assert temp["pallas_gpu"] * 20 < temp["xla"]


def _logprob_grad(fn, **options):
    def loss(h, w, t):
        return fn(h, w, t, **options).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("gpu", ["h100", "a100"])
def test_token_logprobs_compiles_for_gpu_within_memory_target(gpu):
    """N=16384, D=2048, V=131072 bf16: loss + grad temporaries <= 10% of the naive log_softmax(h @ w)."""
    device = target_devices(gpu)[0]
    N, D, V = 16384, 2048, 131072
    args = (_on(device, (N, D), jnp.bfloat16), _on(device, (D, V), jnp.bfloat16), _on(device, (N,), jnp.int32))
    ours = _logprob_grad(token_logprobs, impl="pallas_gpu").lower(*args)
    compiled, kernels = aot.compile_with_kernels(ours, gpu)
    _check_resources(kernels, _LOGPROB_KERNELS)
    assert all(k.spill_bytes in (0, None) for k in kernels)
    temp = compiled.memory_analysis().temp_size_in_bytes
    naive = _logprob_grad(token_logprobs_naive).lower(*args).compile().memory_analysis().temp_size_in_bytes
    print(f"{gpu}: pallas_gpu {temp / 2**20:.1f} MiB, naive {naive / 2**20:.1f} MiB ({temp / naive:.1%})")
    assert temp <= 0.10 * naive


def test_token_logprobs_float32_no_spills_on_h100():
    """float32 inputs: the kernels' 3xTF32 dots fit registers (IEEE float32 dots spilled 592 bytes)."""
    device = target_devices("h100")[0]
    N, D, V = 16384, 2048, 131072
    args = (_on(device, (N, D), jnp.float32), _on(device, (D, V), jnp.float32), _on(device, (N,), jnp.int32))
    _, kernels = aot.compile_with_kernels(_logprob_grad(token_logprobs, impl="pallas_gpu").lower(*args), "h100")
    _check_resources(kernels, _LOGPROB_KERNELS)
    assert all(k.spill_bytes in (0, None) for k in kernels)


def test_token_logprobs_entropy_softcap_odd_shapes_compile_for_h100():
    device = target_devices("h100")[0]
    N, D, V = 1000, 576, 50257
    args = (_on(device, (N, D), jnp.float32), _on(device, (D, V), jnp.float32), _on(device, (N,), jnp.int32))

    def loss(h, w, t):
        lp, ent = token_logprobs(h, w, t, temperature=0.7, softcap=30.0, return_entropy=True, impl="pallas_gpu")
        return lp.sum() + 0.1 * ent.sum()

    jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()


def test_sharded_kernels_compile_on_two_gpus():
    """shard_map paths: attention heads over tensor, log-prob tokens over fsdp and vocabulary over tensor."""
    devices = target_devices("h100:4")
    mesh = Mesh(devices.reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    spec = lambda shape, dtype, *axes: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))  # noqa: E731
    q = spec((4, 2048, 8, 128), jnp.bfloat16, ("data", "fsdp"), None, "tensor", None)
    kv = spec((4, 2048, 2, 128), jnp.bfloat16, ("data", "fsdp"), None, "tensor", None)

    def attn_loss(q, k, v):
        return attention_sharded(q, k, v, mesh=mesh).astype(jnp.float32).sum()

    hlo = jax.jit(jax.grad(attn_loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()
    assert hlo.count('custom_call_target="__gpu$xla.gpu.triton"') == 3  # "auto" picked the Pallas GPU kernels

    h = spec((8192, 1024), jnp.bfloat16, ("data", "fsdp"), None)
    w = spec((1024, 32768), jnp.bfloat16, None, "tensor")
    t = spec((8192,), jnp.int32, ("data", "fsdp"))

    def lp_loss(h, w, t):
        return token_logprobs_sharded(h, w, t, mesh=mesh, vocab_axis="tensor").sum()

    hlo = jax.jit(jax.grad(lp_loss, argnums=(0, 1))).lower(h, w, t).compile().as_text()
    assert 'custom_call_target="__gpu$xla.gpu.triton"' in hlo


def test_tiny_sft_step_compiles_for_gpus():
    """The whole SFT step (model with both Pallas GPU kernels, sharded over 4 GPUs) compiles and fits."""
    import sys

    target_devices("h100:4")
    sys.path.insert(0, os.path.join(ROOT, "tpu"))
    from aot_compile import compile_sft_step

    report = compile_sft_step(os.path.join(ROOT, "experiments", "sft", "tiny.py"), "h100:4",
                              ["mesh.fsdp=2", "mesh.data=2", "lora.rank=4"])
    assert report["fits"] and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report["pallas_kernel_calls"] >= 5  # attention fwd/dq/dkv + log-prob kernels


# The log-prob backend's kernel names (forward, and the backward's logits-gradient kernel).
_LOGPROB_KERNELS = ["polmjax_logprobs_fwd", "polmjax_logprobs_dz"]
