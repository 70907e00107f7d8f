"""Ahead-of-time compilation of the Pallas TPU flash attention for real TPU generations, from this CPU host.

`jax.jit(...).lower(...).compile()` on abstract TPU devices runs the real Mosaic and XLA:TPU compilers: they
reject illegal block shapes and VMEM / HBM overflow. Shapes are realistic (bf16, T = S = 8192, head dim
128, H=8 query heads over G=2 kv heads, B=4 split over devices) and the kernels run under `jax.shard_map`
through `attention_sharded`, forward and backward (grad of sum(out) wrt q, k, v).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from aot_targets import target_devices
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from polmjax.kernels.attention.ops import BlockSizes, attention, attention_sharded

pytestmark = pytest.mark.tpu_aot

TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")
B, T, H, G, K = 4, 8192, 8, 2, 128
AXES = ("data", "fsdp", "tensor")


def _inputs(mesh):
    """Abstract q, k, v, segment ids: batch over (data, fsdp), heads over tensor (kv heads when divisible)."""
    tensor = mesh.shape["tensor"]
    act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    kv = act if G % tensor == 0 else NamedSharding(mesh, P(("data", "fsdp"), None, None, None))
    q = jax.ShapeDtypeStruct((B, T, H, K), jnp.bfloat16, sharding=act)
    k = jax.ShapeDtypeStruct((B, T, G, K), jnp.bfloat16, sharding=kv)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
    return q, k, k, seg


# case -> (mesh shape, attention options). "segments_window_softcap" has tensor=4 > G=2 kv heads: the
# replicated-kv path of attention_sharded.
CASES = {
    "causal": ((2, 1, 2), dict()),
    "segments_window_softcap": ((1, 1, 4), dict(window=1024, softcap=50.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_flash_attention_compiles_forward_and_backward(topology, case):
    devices = target_devices(topology)
    mesh_shape, options = CASES[case]
    mesh = jax.sharding.Mesh(devices.reshape(mesh_shape), AXES)
    blocks = BlockSizes.for_tpu(devices.flat[0].device_kind)  # what impl="auto" picks from the mesh
    segmented = case.startswith("segments")

    def forward(q, k, v, seg):
        return attention_sharded(q, k, v, mesh=mesh, causal=True, segment_ids=seg if segmented else None,
                                 **options)

    def loss(q, k, v, seg):
        return jnp.sum(forward(q, k, v, seg).astype(jnp.float32))

    args = _inputs(mesh)
    for name, fn in (("forward", forward), ("backward", jax.grad(loss, argnums=(0, 1, 2)))):
        compiled = jax.jit(fn).lower(*args).compile()
        text = compiled.as_text()
        assert "polmjax_flash_fwd" in text
        if name == "backward":
            assert "polmjax_flash_dq" in text and "polmjax_flash_dkv" in text
        temp = compiled.memory_analysis().temp_size_in_bytes
        print(f"{topology} {case} {name}: {blocks}, temp {temp / 2**20:.1f} MiB per device")


def test_flash_train_step_uses_less_memory_than_xla_on_v5e():
    """loss + grad through attention: flash (no [T, S] logits) against the XLA reference, temp bytes."""
    devices = target_devices("v5e:2x2")
    mesh = jax.sharding.Mesh(devices.reshape(2, 1, 2), AXES)
    q, k, v, _ = _inputs(mesh)

    def train_step(attend):
        def loss(q, k, v):
            return jnp.mean(jnp.square(attend(q, k, v).astype(jnp.float32)))

        return jax.value_and_grad(loss, argnums=(0, 1, 2))

    flash = train_step(lambda q, k, v: attention_sharded(q, k, v, mesh=mesh))
    xla = train_step(lambda q, k, v: attention(q, k, v, impl="xla"))
    temp = {name: jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
            for name, fn in (("flash", flash), ("xla", xla))}
    print(f"v5e:2x2 train step temp per device: flash {temp['flash']:,} B, xla reference {temp['xla']:,} B")
    # The reference holds [B, G, R, T, S] float32 logits and probabilities (GiBs at T=8192); flash holds
    # O(T) statistics.
    assert temp["xla"] > 2**30
    assert temp["flash"] * 10 < temp["xla"]
