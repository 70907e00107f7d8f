"""Validation and backend dispatch for `attention`, and `attention_sharded` for meshes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from polmjax.kernels.attention.flash import BlockSizes, Static, flash_attention
from polmjax.kernels.attention.reference import attention_reference
from polmjax.kernels.backends import pallas_backend

# "auto": pallas_tpu on TPU, pallas_gpu on GPU, xla elsewhere. "xla": the pure-jnp reference.
# "pallas_tpu" / "pallas_gpu": FlashAttention-2 Pallas kernels (Mosaic TPU / Triton), forward + backward.
# "cudnn": jax.nn.dot_product_attention(implementation="cudnn"), for the calls its feature set covers.
IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu", "cudnn")

__all__ = ["IMPLS", "BlockSizes", "attention", "attention_sharded"]


def attention(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGK: jax.Array,
    *,
    causal: bool = True,
    segment_ids=None,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    q_offset=None,
    impl: str = "auto",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Multi-head attention with GQA/MQA, causal masking, packed segments, sliding window, soft-cap.

    Args:
      q_BTHK: queries [batch, query length, heads, head dim].
      k_BSGK, v_BSGK: keys and values [batch, key length, kv heads, head dim]; heads % kv heads == 0.
      causal: query t (at key index q_offset + t) sees keys s <= q_offset + t.
      segment_ids: [B, T] ids (self-attention, T == S), or a pair (q_segment_BT, kv_segment_BS);
        a query sees only keys with its id, so packed documents never attend across each other.
      window: a query sees at most `window` keys, itself included (sliding-window attention).
      softcap: logits -> softcap * tanh(logits / softcap) (Gemma 2).
      scale: logit scale, default head_dim ** -0.5.
      q_offset: key index of query 0 (an int or a traced scalar); default S - T. KV-cache decoding
        passes the cache position here. Every backend but cudnn takes a traced offset (the Pallas
        TPU kernels read it by scalar prefetch, the GPU kernels as a positions array).
      impl: one of IMPLS. "auto" picks pallas_tpu on TPU, pallas_gpu on GPU and xla elsewhere (from
        `jax.default_backend()`). The Pallas kernels are not partitioned by XLA: on a mesh of several
        devices call `attention_sharded`, whose "auto" follows the mesh's devices.
      interpret: run a Pallas backend in interpret mode (CPU tests).
      block_sizes: Pallas tile sizes; default `BlockSizes.default(impl, ...)` for the current device and dtype.
    Returns:
      [B, T, H, K] in q's dtype. Softmax statistics are float32; a query that sees no key gets zeros.

    window and softcap (and scale) must be Python numbers for the Pallas backends: they shape the kernel.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention: impl={impl!r} is not available; choose one of {IMPLS}")
    if impl.startswith("pallas"):
        for name, value in (("window", window), ("softcap", softcap), ("scale", scale)):
            if isinstance(value, jax.Array):
                raise ValueError(f"attention(impl={impl!r}): {name} must be a Python number, not an array")
    q_seg, kv_seg = _check(q_BTHK, k_BSGK, v_BSGK, segment_ids, window, softcap)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"attention: block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}")
    if impl == "auto":
        impl = _auto_impl(jax.default_backend())
    if impl == "xla":
        return attention_reference(
            q_BTHK, k_BSGK, v_BSGK, causal=causal, q_segment_BT=q_seg, kv_segment_BS=kv_seg,
            window=window, softcap=softcap, scale=scale, q_offset=q_offset,
        )
    if impl == "cudnn":
        return _cudnn(q_BTHK, k_BSGK, v_BSGK, q_seg, kv_seg, causal, window, softcap, scale, q_offset)
    T, K = q_BTHK.shape[1], q_BTHK.shape[3]
    S = k_BSGK.shape[1]
    static = Static(
        causal=bool(causal),
        window=None if window is None else int(window),
        softcap=None if softcap is None else float(softcap),
        scale=float(K**-0.5 if scale is None else scale),
        blocks=block_sizes or BlockSizes.default(impl, interpret, head_dim=K, dtype=q_BTHK.dtype),
        interpret=bool(interpret),
    )
    offset = jnp.asarray(S - T if q_offset is None else q_offset, jnp.int32)
    if offset.ndim:
        raise ValueError(f"attention: q_offset must be a scalar, got shape {offset.shape}")
    if q_seg is not None:
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
    backend = pallas_backend(__package__, impl)
    return flash_attention(backend, q_BTHK, k_BSGK, v_BSGK, q_seg, kv_seg, offset, static)


def attention_sharded(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGK: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    head_axis: str = "tensor",
    causal: bool = True,
    segment_ids=None,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    q_offset=None,
    impl: str = "auto",
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """`attention` run per device under `jax.shard_map`: batch over `batch_axes`, heads over `head_axis`.

    Pallas kernels are opaque to XLA's partitioner (it would gather the whole batch onto every device),
    so on a mesh they run inside shard_map, each device on its own batch rows and heads. Query heads
    are split over `head_axis`. KV heads are split the same way when G is divisible by the axis size;
    otherwise (e.g. G=2 kv heads, tensor=4) every device's query heads fall in one kv group when
    (H / tensor) divides R = H / G: K/V are then replicated over `head_axis` (they are G/H the size of
    q) and each device slices its one kv head, so nothing is repeated per query head; any other split
    would mix groups inside a device and raises. Sequence axes are not sharded (no context
    parallelism). "auto" and the default block sizes follow the mesh's devices (not the default
    backend), so compiling ahead of time for a TPU topology from a CPU host picks the TPU kernels and
    that generation's tiles. Other arguments as `attention`.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention_sharded: impl={impl!r} is not available; choose one of {IMPLS}")
    device = mesh.devices.flat[0]
    if impl == "auto":
        impl = _auto_impl(device.platform)
    if block_sizes is None and impl.startswith("pallas"):
        block_sizes = BlockSizes.default(impl, interpret, head_dim=q_BTHK.shape[3], device_kind=device.device_kind,
                                        dtype=q_BTHK.dtype)
    q_seg, kv_seg = _check(q_BTHK, k_BSGK, v_BSGK, segment_ids, window, softcap)
    B, T, H, K = q_BTHK.shape
    G = k_BSGK.shape[2]
    R = H // G
    for axis in (*batch_axes, head_axis):
        if axis not in mesh.shape:
            raise ValueError(f"attention_sharded: mesh axes {tuple(mesh.shape)} lack {axis!r}")
    n_batch = 1
    for axis in batch_axes:
        n_batch *= mesh.shape[axis]
    n_heads = mesh.shape[head_axis]
    if B % n_batch:
        raise ValueError(f"attention_sharded: batch {B} not divisible by mesh {batch_axes} size {n_batch}")
    if H % n_heads:
        raise ValueError(f"attention_sharded: heads {H} not divisible by mesh {head_axis!r} size {n_heads}")
    H_local = H // n_heads
    shard_kv = G % n_heads == 0
    if not shard_kv and R % H_local:
        raise ValueError(
            f"attention_sharded: kv heads {G} are not divisible by {head_axis!r} size {n_heads}, and the "
            f"{H_local} query heads per device span more than one kv group (R={R}); choose a tensor size "
            "that divides the kv heads or makes each device's heads fall in one group"
        )
    bspec = batch_axes if len(batch_axes) != 1 else batch_axes[0]
    q_spec = P(bspec, None, head_axis, None)
    kv_spec = P(bspec, None, head_axis, None) if shard_kv else P(bspec, None, None, None)
    seg_spec = P(bspec, None)
    traced_offset = q_offset is not None and not isinstance(q_offset, (int, np.integer))
    kwargs = dict(causal=causal, window=window, softcap=softcap, scale=scale, impl=impl,
                  interpret=interpret, block_sizes=block_sizes)
    if q_offset is None:
        q_offset = k_BSGK.shape[1] - T

    def local(q, k, v, q_seg, kv_seg, offset):
        if not shard_kv:
            first_kv = (lax.axis_index(head_axis) * H_local) // R
            k = lax.dynamic_slice_in_dim(k, first_kv, 1, axis=2)
            v = lax.dynamic_slice_in_dim(v, first_kv, 1, axis=2)
        segs = None if q_seg is None else (q_seg, kv_seg)
        return attention(q, k, v, segment_ids=segs, q_offset=offset if traced_offset else q_offset, **kwargs)

    segs_spec = None if q_seg is None else seg_spec
    offset_arg = jnp.asarray(q_offset, jnp.int32) if traced_offset else None
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, segs_spec, segs_spec, P() if traced_offset else None),
        out_specs=q_spec,
        # pallas_call outputs carry no varying-manual-axes type; with check_vma=False the transpose
        # psums the cotangents of the replicated K/V over head_axis, as the gradient needs.
        check_vma=False,
    )(q_BTHK, k_BSGK, v_BSGK, q_seg, kv_seg, offset_arg)


def _auto_impl(platform: str) -> str:
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(platform, "xla")


def _cudnn(q, k, v, q_seg, kv_seg, causal, window, softcap, scale, q_offset):
    """jax.nn.dot_product_attention(implementation="cudnn") where it means the same as ours."""
    T, S = q.shape[1], k.shape[1]
    if softcap is not None:
        raise ValueError("attention(impl='cudnn'): softcap is not supported by cuDNN; use impl='pallas_gpu'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention(impl='cudnn'): dtype {q.dtype} is not supported by cuDNN; use bf16/fp16")
    if window is not None and not causal:
        raise ValueError("attention(impl='cudnn'): a non-causal window is not supported by cuDNN")
    if causal or window is not None:
        # cuDNN aligns the causal diagonal at query 0 == key 0, i.e. q_offset == 0.
        offset = S - T if q_offset is None else q_offset
        if not isinstance(offset, (int, np.integer)) or offset != 0:
            raise ValueError(
                f"attention(impl='cudnn'): q_offset={offset!r} is not supported by cuDNN (causal masks need "
                "q_offset == 0, i.e. T == S); use impl='pallas_gpu'"
            )
    # cuDNN has no segment-id input: packed documents go in as a dense [B, 1, T, S] boolean mask (O(T * S)
    # memory per call, where the Pallas kernels compare ids tile by tile).
    mask = None if q_seg is None else (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn",
    )


def _check(q, k, v, segment_ids, window, softcap):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be rank 4 [B, T, H, K]; got q{q.shape} k{k.shape} v{v.shape}")
    B, T, H, K = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k{k.shape} and v{v.shape} must have the same shape")
    if k.shape[0] != B or k.shape[3] != K:
        raise ValueError(f"attention: k{k.shape} does not match q{q.shape} in batch or head dim")
    if H % k.shape[2]:
        raise ValueError(f"attention: q heads {H} not a multiple of kv heads {k.shape[2]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    # Traced window / softcap (allowed by the xla backend) are not range-checked.
    if window is not None and not isinstance(window, jax.Array) and window < 1:
        raise ValueError(f"attention: window must be >= 1, got {window}")
    if softcap is not None and not isinstance(softcap, jax.Array) and softcap <= 0:
        raise ValueError(f"attention: softcap must be > 0, got {softcap}")
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        q_seg, kv_seg = segment_ids
    else:
        if T != k.shape[1]:
            raise ValueError(
                f"attention: one segment_ids array needs T == S, got T={T} S={k.shape[1]}; pass "
                "(q_segment_ids, kv_segment_ids)"
            )
        q_seg = kv_seg = segment_ids
    if q_seg.shape != (B, T) or kv_seg.shape != (B, k.shape[1]):
        raise ValueError(
            f"attention: segment_ids shapes {q_seg.shape}, {kv_seg.shape}; expected {(B, T)}, {(B, k.shape[1])}"
        )
    return q_seg, kv_seg
