"""FlashAttention `custom_vjp` wiring shared by the Pallas backends, their block sizes and block ranges.

A backend module (`tpu`, `gpu`) provides two functions over unpadded [B, T, H, K] / [B, S, G, K] arrays:

  forward(q, k, v, q_seg, kv_seg, q_offset, static) -> (out_BTHK, lse)
  backward(q, k, v, q_seg, kv_seg, q_offset, di_BHT, lse, dout, static) -> (dq, dk, dv)

where di_BHT = rowsum(out * dout) in float32 (FlashAttention-2's D), computed here once for both.

`lse` (float32 logsumexp of each query row, in whatever padded layout the backend likes) is the only
residual besides the inputs and the output: the backward recomputes the probabilities from it
(FlashAttention-2, Dao 2023, arXiv:2307.08691, algorithm 2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np


# Logit of a masked (query, key) pair: finite, so a fully masked tile keeps finite running maxima.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Pallas attention kernels; they change speed and VMEM/SMEM use, not results.

    block_q, block_kv: query and key tiles of the forward kernel. block_q_bwd, block_kv_bwd: tiles of
    both backward kernels (dq and dk/dv); None means the forward ones. Tiles longer than the (padded)
    sequence are clipped to it. TPU tiles must be multiples of 128; GPU tiles powers of two >= 16.
    """

    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

    @property
    def q_bwd(self) -> int:
        return self.block_q if self.block_q_bwd is None else self.block_q_bwd

    @property
    def kv_bwd(self) -> int:
        return self.block_kv if self.block_kv_bwd is None else self.block_kv_bwd

    @classmethod
    def for_tpu(cls, device_kind: str | None = None) -> BlockSizes:
        """Defaults per TPU generation (`jax.devices()[0].device_kind`, e.g. "TPU v5 lite").

        v5e/v5p/v6e: 512 x 1024 forward tiles (fewer grid steps; the [512, 1024] float32 logits tile and
        its siblings stay well inside the scoped VMEM limit, checked by tests/test_attention_tpu_aot.py),
        512 x 512 backward tiles (the dk/dv kernel holds more [bkv, bq] float32 temporaries).
        Older or unknown generations: 256 x 512 forward and 256 x 256 backward tiles.
        """
        kind = (device_kind or "").lower()
        if "v5" in kind or "v6" in kind:  # "TPU v5 lite" (v5e), "TPU v5" / "TPU v5p", "TPU v6 lite" (v6e)
            return cls(block_q=512, block_kv=1024, block_q_bwd=512, block_kv_bwd=512)
        return cls(block_q=256, block_kv=512, block_q_bwd=256, block_kv_bwd=256)

    @classmethod
    def for_gpu(cls, head_dim: int = 128, device_kind: str | None = None, dtype=jnp.bfloat16) -> BlockSizes:
        """Triton defaults for A100/H100-class GPUs (the FlashAttention-2 Triton tiles).

        Head dim <= 128: 128 x 64 forward, 64 x 64 backward tiles. Larger head dims (Gemma's 256) halve
        the tiles so the float32 accumulators stay in registers and K/V stages in shared memory. Before
        Hopper (no wgmma, e.g. A100) the dk/dv kernel at head dim <= 64 spills registers with 64-key
        tiles (ptxas: 104 bytes), so it takes 32-key tiles there. float32 inputs (3xTF32 dots) take
        32 x 32 tiles everywhere: larger ones overflow shared memory or spill more; the dk/dv kernel still
        spills up to ~100 bytes at head dim 64/128, and at 256 every kernel spills KiBs (float32 attention
        is correct there, not fast: use bf16). Chosen from the compiled kernels' registers, spills and shared memory
        (`polmjax.aot.compile_with_kernels`), not from timings.
        """
        if jnp.dtype(dtype) == jnp.float32:
            return cls(block_q=32, block_kv=32, block_q_bwd=32, block_kv_bwd=32)
        hopper = any(name in (device_kind or "") for name in ("H100", "H200", "H800", "GH200"))
        if head_dim <= 128:
            return cls(block_q=128, block_kv=64, block_q_bwd=64,
                       block_kv_bwd=64 if hopper or head_dim > 64 else 32)
        return cls(block_q=64, block_kv=32, block_q_bwd=32, block_kv_bwd=32)

    @classmethod
    def default(cls, impl: str, interpret: bool = False, head_dim: int = 128,
                device_kind: str | None = None, dtype=jnp.bfloat16) -> BlockSizes:
        """Defaults for `impl` ("pallas_tpu" / "pallas_gpu") on `device_kind` (default: the default device)."""
        if interpret:
            # Small tiles keep interpret mode (CPU) fast and still exercise several blocks per row.
            return cls(block_q=128, block_kv=128) if impl == "pallas_tpu" else cls(block_q=32, block_kv=32)
        device_kind = device_kind or jax.devices()[0].device_kind
        if impl == "pallas_tpu":
            return cls.for_tpu(device_kind)
        return cls.for_gpu(head_dim, device_kind, dtype)


@dataclasses.dataclass(frozen=True)
class Static:
    """Hashable, trace-time arguments of a flash attention call (the `nondiff_argnums` of the vjp)."""

    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    blocks: BlockSizes
    interpret: bool


def flash_attention(backend: ModuleType, q_BTHK, k_BSGK, v_BSGK, q_seg_BT, kv_seg_BS, q_offset,
                    static: Static) -> jax.Array:
    """Attention through `backend`'s Pallas kernels, differentiable in q, k and v.

    q_offset: int32 scalar array (key index of query 0). q_seg_BT / kv_seg_BS: int32 or None.
    """
    return _flash(backend, q_BTHK, k_BSGK, v_BSGK, q_seg_BT, kv_seg_BS, q_offset, static)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7))
def _flash(backend, q, k, v, q_seg, kv_seg, q_offset, static):
    out, _ = backend.forward(q, k, v, q_seg, kv_seg, q_offset, static)
    return out


def _flash_fwd(backend, q, k, v, q_seg, kv_seg, q_offset, static):
    out, lse = backend.forward(q, k, v, q_seg, kv_seg, q_offset, static)
    return out, (q, k, v, q_seg, kv_seg, q_offset, out, lse)


def _flash_bwd(backend, static, residuals, dout):
    q, k, v, q_seg, kv_seg, q_offset, out, lse = residuals
    di_BHT = jnp.einsum("bthk,bthk->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
    dq, dk, dv = backend.backward(q, k, v, q_seg, kv_seg, q_offset, di_BHT, lse, dout, static)
    # Integer inputs (segment ids, offset) get no cotangent.
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# Block ranges -------------------------------------------------------------------------------------
# Query row t sits at key index q_offset + t. A (query block, key block) pair is computed only when some
# query of the block may see some key of the block; both backends use these bounds, in block units,
# from traced scalars (so a traced q_offset works).


def kv_block_range(q_first, q_last, *, bk: int, nk: int, static: Static):
    """Key blocks [lo, hi] that queries at key indices [q_first, q_last] may see (empty when lo > hi)."""
    lo, hi = jnp.int32(0), jnp.int32(nk - 1)
    if static.causal:
        hi = jnp.minimum(hi, floor_div(q_last, bk))
    if static.window is not None:
        lo = jnp.maximum(lo, floor_div(q_first - static.window + 1, bk))
        if not static.causal:
            hi = jnp.minimum(hi, floor_div(q_last + static.window - 1, bk))
    return lo, hi


def q_block_range(k_first, k_last, q_offset, *, bq: int, nq: int, static: Static):
    """Query blocks [lo, hi] whose rows may see some key in [k_first, k_last] (empty when lo > hi)."""
    lo, hi = jnp.int32(0), jnp.int32(nq - 1)
    if static.causal:
        lo = jnp.maximum(lo, floor_div(k_first - q_offset, bq))
    if static.window is not None:
        hi = jnp.minimum(hi, floor_div(k_last + static.window - 1 - q_offset, bq))
        if not static.causal:
            lo = jnp.maximum(lo, floor_div(k_first - static.window + 1 - q_offset, bq))
    return lo, hi


def full_kv_block_range(q_first, q_last, *, bk: int, S: int, static: Static):
    """Key blocks [lo, hi] that queries at key indices [q_first, q_last] see entirely: no mask needed.

    Segment ids are not considered (a segmented tile is always masked). Padded keys (>= S) count as
    masked; extra query rows past the real ones only make the range narrower (safe).
    """
    lo, hi = jnp.int32(0), jnp.int32(S // bk - 1)  # blocks holding no padded key
    if static.causal:
        hi = jnp.minimum(hi, floor_div(q_first + 1, bk) - 1)
    if static.window is not None:
        lo = jnp.maximum(lo, floor_div(q_last - static.window, bk) + 1)
        if not static.causal:
            hi = jnp.minimum(hi, floor_div(q_first + static.window - bk, bk))
    return lo, hi


def full_q_block_range(k_first, k_last, q_offset, *, bq: int, nq: int, S: int, static: Static):
    """Query blocks [lo, hi] all of whose rows see every key in [k_first, k_last] (see full_kv_block_range).

    k_last is the block's last key index, padding included: a block holding padded keys is never full.
    """
    lo = jnp.int32(0)
    hi = jnp.where(k_last >= S, jnp.int32(-1), jnp.int32(nq - 1))
    if static.causal:
        lo = jnp.maximum(lo, floor_div(k_last - q_offset + bq - 1, bq))
    if static.window is not None:
        hi = jnp.minimum(hi, floor_div(k_first + static.window - q_offset - bq, bq))
        if not static.causal:
            lo = jnp.maximum(lo, floor_div(k_last - q_offset - static.window, bq) + 1)
    return lo, hi


def has_positional_mask(static: Static, S: int, S_pad: int) -> bool:
    """Whether any tile can need a causal / window / key-padding mask (segments aside)."""
    return static.causal or static.window is not None or S_pad != S


def floor_div(x, d: int):
    """Floor division of int32 x by a positive int, with truncating division only (TPU scalar core)."""
    x = jnp.asarray(x, jnp.int32)
    d_ = jnp.full(x.shape, d, jnp.int32)
    return jnp.where(x >= 0, jax.lax.div(x, d_), -jax.lax.div(d - 1 - x, d_))


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)
