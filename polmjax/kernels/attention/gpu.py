"""FlashAttention for GPU in Pallas (Triton backend): a forward kernel and two backward kernels (dq, dk/dv).

Arrays stay in [B, T, H, K] layout; T and S are padded to tile multiples and K to a power of two (>= 16,
Triton's smallest dot). Each forward / dq program owns one query tile of one head and loops over the key
tiles its queries may see; each dk/dv program owns one key tile of one kv head and loops over the R query
heads of its group and the query tiles that may see it, so GQA K/V are never repeated and dk/dv need no
atomics. Query positions (q_offset + t, possibly traced) arrive as an int32 array, from which the loop
bounds and masks are computed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from polmjax.kernels.attention.flash import (
    MASK_VALUE,
    Static,
    full_kv_block_range,
    full_q_block_range,
    has_positional_mask,
    kv_block_range,
    q_block_range,
    round_up,
)
from polmjax.kernels.backends import triton_dot_precision


def forward(q_BTHK, k_BSGK, v_BSGK, q_seg_BT, kv_seg_BS, q_offset, static: Static):
    """Returns (out_BTHK, lse_BHT): the output and the float32 logsumexp rows (padded length)."""
    geo = _Geometry.of(q_BTHK, k_BSGK, static)
    q = _pad(q_BTHK, geo.T_pad, geo.Kp)
    k = _pad(k_BSGK, geo.S_pad, geo.Kp)
    v = _pad(v_BSGK, geo.S_pad, geo.Kp)
    pos = _positions(q_offset, geo)
    bq = geo.bq
    R = geo.H // geo.G
    in_specs = [
        pl.BlockSpec((bq,), lambda i, b, h: (i,)),
        pl.BlockSpec((None, bq, None, geo.Kp), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, geo.S_pad, None, geo.Kp), lambda i, b, h: (b, 0, h // R, 0)),
        pl.BlockSpec((None, geo.S_pad, None, geo.Kp), lambda i, b, h: (b, 0, h // R, 0)),
    ]
    inputs = [pos, q, k, v]
    segmented = q_seg_BT is not None
    if segmented:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, geo.S_pad), lambda i, b, h: (b, 0))]
        inputs += [_pad_seg(q_seg_BT, geo.T_pad), _pad_seg(kv_seg_BS, geo.S_pad)]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, geo=geo, static=static, segmented=segmented),
        grid=(geo.T_pad // bq, geo.B, geo.H),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, geo.Kp), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((geo.B, geo.H, geo.T_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=geo.num_warps, num_stages=2),
        interpret=static.interpret,
        name="polmjax_flash_fwd",
    )(*inputs)
    return out[:, : geo.T, :, : geo.K], lse


def backward(q_BTHK, k_BSGK, v_BSGK, q_seg_BT, kv_seg_BS, q_offset, di_BHT, lse_BHT, dout_BTHK,
             static: Static):
    """FlashAttention-2 backward: dq from a dq kernel, dk/dv from a dk/dv kernel. Returns (dq, dk, dv)."""
    geo = _Geometry.of(q_BTHK, k_BSGK, static)
    di_BHT = jnp.pad(di_BHT, ((0, 0), (0, 0), (0, geo.T_pad - geo.T)))
    q = _pad(q_BTHK, geo.T_pad, geo.Kp)
    do = _pad(dout_BTHK.astype(q_BTHK.dtype), geo.T_pad, geo.Kp)
    k = _pad(k_BSGK, geo.S_pad, geo.Kp)
    v = _pad(v_BSGK, geo.S_pad, geo.Kp)
    pos = _positions(q_offset, geo)
    segmented = q_seg_BT is not None
    segs = [_pad_seg(q_seg_BT, geo.T_pad), _pad_seg(kv_seg_BS, geo.S_pad)] if segmented else []
    bq, bk, Kp = geo.bq_bwd, geo.bk_bwd, geo.Kp
    R = geo.H // geo.G
    params = plgpu.CompilerParams(num_warps=geo.num_warps, num_stages=2)

    dq_specs = [
        pl.BlockSpec((bq,), lambda i, b, h: (i,)),
        pl.BlockSpec((None, bq, None, Kp), lambda i, b, h: (b, i, h, 0)),  # q
        pl.BlockSpec((None, geo.S_pad, None, Kp), lambda i, b, h: (b, 0, h // R, 0)),  # k
        pl.BlockSpec((None, geo.S_pad, None, Kp), lambda i, b, h: (b, 0, h // R, 0)),  # v
        pl.BlockSpec((None, bq, None, Kp), lambda i, b, h: (b, i, h, 0)),  # do
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),  # lse
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),  # di
    ]
    if segmented:
        dq_specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                     pl.BlockSpec((None, geo.S_pad), lambda i, b, h: (b, 0))]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, geo=geo, static=static, segmented=segmented),
        grid=(geo.T_pad // bq, geo.B, geo.H),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((None, bq, None, Kp), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=static.interpret,
        name="polmjax_flash_dq",
    )(pos, q, k, v, do, lse_BHT, di_BHT, *segs)

    dkv_specs = [
        pl.BlockSpec((geo.T_pad,), lambda j, b, g: (0,)),
        pl.BlockSpec((None, geo.T_pad, R, Kp), lambda j, b, g: (b, 0, g, 0)),  # q: the R heads of group g
        pl.BlockSpec((None, bk, None, Kp), lambda j, b, g: (b, j, g, 0)),  # k
        pl.BlockSpec((None, bk, None, Kp), lambda j, b, g: (b, j, g, 0)),  # v
        pl.BlockSpec((None, geo.T_pad, R, Kp), lambda j, b, g: (b, 0, g, 0)),  # do
        pl.BlockSpec((None, R, geo.T_pad), lambda j, b, g: (b, g, 0)),  # lse
        pl.BlockSpec((None, R, geo.T_pad), lambda j, b, g: (b, g, 0)),  # di
    ]
    if segmented:
        dkv_specs += [pl.BlockSpec((None, geo.T_pad), lambda j, b, g: (b, 0)),
                      pl.BlockSpec((None, bk), lambda j, b, g: (b, j))]
    kv_out = jax.ShapeDtypeStruct(k.shape, k.dtype)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, geo=geo, static=static, segmented=segmented),
        grid=(geo.S_pad // bk, geo.B, geo.G),
        in_specs=dkv_specs,
        out_specs=[pl.BlockSpec((None, bk, None, Kp), lambda j, b, g: (b, j, g, 0))] * 2,
        out_shape=[kv_out, kv_out],
        compiler_params=params,
        interpret=static.interpret,
        name="polmjax_flash_dkv",
    )(pos, q, k, v, do, lse_BHT, di_BHT, *segs)
    T, S, K = geo.T, geo.S, geo.K
    return dq[:, :T, :, :K], dk[:, :S, :, :K], dv[:, :S, :, :K]


# Kernels ------------------------------------------------------------------------------------------


def _fwd_kernel(pos_ref, q_ref, k_ref, v_ref, *refs, geo, static, segmented):
    if segmented:
        qseg_ref, kvseg_ref, o_ref, lse_ref = refs
    else:
        (o_ref, lse_ref), qseg_ref, kvseg_ref = refs, None, None
    bq, bk = geo.bq, geo.bk
    q_pos = pos_ref[...]
    q = q_ref[...]
    q_seg = qseg_ref[...] if segmented else None
    ranges = _kv_ranges(q_pos, bk, geo, static)

    def body(j, carry, masked):
        acc, m, l = carry
        k_slice = pl.ds(j * bk, bk)
        s, _ = _logits(q, k_ref[k_slice, :], static)  # [bq, bk]
        mask = _key_block_mask(q_pos, q_seg, kvseg_ref, j, bk, geo, static) if masked else None
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        v = v_ref[k_slice, :]
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=triton_dot_precision(v.dtype, static.interpret))
        return acc, m_next, l * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((bq, geo.Kp), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = _tile_loop(body, init, *ranges, geo=geo, static=static, segmented=segmented)
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = jnp.where(empty[:, None], 0.0, acc / safe_l[:, None]).astype(o_ref.dtype)
    # Rows that see no key get lse = +inf, so the backward's exp(s - lse) is exactly 0 for them.
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(safe_l))


def _dq_kernel(pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, geo, static, segmented):
    if segmented:
        qseg_ref, kvseg_ref, dq_ref = refs
    else:
        (dq_ref,), qseg_ref, kvseg_ref = refs, None, None
    bq, bk = geo.bq_bwd, geo.bk_bwd
    q_pos = pos_ref[...]
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...], di_ref[...]
    q_seg = qseg_ref[...] if segmented else None
    ranges = _kv_ranges(q_pos, bk, geo, static)

    def body(j, dq, masked):
        k_slice = pl.ds(j * bk, bk)
        k, v = k_ref[k_slice, :], v_ref[k_slice, :]
        s, tanh = _logits(q, k, static)
        p = jnp.exp(s - lse[:, None])
        mask = _key_block_mask(q_pos, q_seg, kvseg_ref, j, bk, geo, static) if masked else None
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = plgpu.dot(do, v, trans_b=True, precision=triton_dot_precision(v.dtype, static.interpret))
        ds = p * (dp - di[:, None])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=triton_dot_precision(k.dtype, static.interpret))

    dq = _tile_loop(body, jnp.zeros((bq, geo.Kp), jnp.float32), *ranges, geo=geo, static=static,
                    segmented=segmented)
    dq_ref[...] = (dq * static.scale).astype(dq_ref.dtype)


def _dkv_kernel(pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, geo, static, segmented):
    if segmented:
        qseg_ref, kvseg_ref, dk_ref, dv_ref = refs
    else:
        (dk_ref, dv_ref), qseg_ref, kvseg_ref = refs, None, None
    bq, bk = geo.bq_bwd, geo.bk_bwd
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_pos = j * bk + jnp.arange(bk)
    kv_seg = kvseg_ref[...] if segmented else None
    offset = jnp.min(pos_ref[pl.ds(0, bq)])
    k_first, k_last = j * bk, jnp.minimum(j * bk + bk, geo.S) - 1
    nq = -(-geo.T // bq)  # query blocks holding real rows
    ranges = (*q_block_range(k_first, k_last, offset, bq=bq, nq=nq, static=static),
              *full_q_block_range(k_first, j * bk + bk - 1, offset, bq=bq, nq=nq, S=geo.S, static=static))

    def q_tile(i, carry, masked, r):
        dk, dv = carry
        q_slice = pl.ds(i * bq, bq)
        q, do = q_ref[q_slice, r, :], do_ref[q_slice, r, :]
        s_t, tanh_t = _logits(k, q, static)  # transposed tile [bk, bq]
        p_t = jnp.exp(s_t - lse_ref[r, q_slice][None, :])
        mask = None
        if masked:
            segs = (qseg_ref[q_slice][None, :], kv_seg[:, None]) if segmented else None
            mask = _mask(pos_ref[q_slice][None, :], k_pos[:, None], geo, static, segs)
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv = dv + plgpu.dot(p_t.astype(do.dtype), do, precision=triton_dot_precision(do.dtype, static.interpret))
        dp_t = plgpu.dot(v, do, trans_b=True, precision=triton_dot_precision(do.dtype, static.interpret))
        ds_t = p_t * (dp_t - di_ref[r, q_slice][None, :])
        if tanh_t is not None:
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        return dk + plgpu.dot(ds_t.astype(q.dtype), q, precision=triton_dot_precision(q.dtype, static.interpret)), dv

    def head(r, carry):
        return _tile_loop(functools.partial(q_tile, r=r), carry, *ranges, geo=geo, static=static,
                          segmented=segmented)

    zeros = jnp.zeros((bk, geo.Kp), jnp.float32)
    dk, dv = lax.fori_loop(0, geo.H // geo.G, head, (zeros, zeros))
    dk_ref[...] = (dk * static.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _logits(a, b, static: Static):
    """scale * a b^T in float32, soft-capped; also tanh(logits / softcap) for the backward's chain rule."""
    s = plgpu.dot(a, b, trans_b=True, precision=triton_dot_precision(a.dtype, static.interpret)) * static.scale
    if static.softcap is None:
        return s, None
    tanh = jnp.tanh(s * (1.0 / static.softcap))
    return tanh * static.softcap, tanh


def _key_block_mask(q_pos, q_seg, kvseg_ref, j, bk: int, geo, static: Static):
    """Mask [bq, bk] of a query tile (positions q_pos, segment ids q_seg or None) against key block j."""
    segs = None if q_seg is None else (q_seg[:, None], kvseg_ref[pl.ds(j * bk, bk)][None, :])
    return _mask(q_pos[:, None], (j * bk + jnp.arange(bk))[None, :], geo, static, segs)


def _mask(q_pos, k_pos, geo, static: Static, segs=None):
    """Mask (causal, window, key padding, and same segment when segs = (q_seg, k_seg)) from broadcastable
    position and segment arrays, or None when nothing is masked."""
    mask = None if segs is None else segs[0] == segs[1]
    if static.causal:
        mask = _and(mask, k_pos <= q_pos)
    if static.window is not None:
        mask = _and(mask, q_pos - k_pos < static.window)
        if not static.causal:
            mask = _and(mask, k_pos - q_pos < static.window)
    if geo.S_pad != geo.S:
        mask = _and(mask, k_pos < geo.S)
    if mask is not None and mask.shape != jnp.broadcast_shapes(q_pos.shape, k_pos.shape):
        mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(q_pos.shape, k_pos.shape))
    return mask


def _and(a, b):
    return b if a is None else a & b


def _kv_ranges(q_pos, bk: int, geo, static: Static):
    """(lo, hi, full_lo, full_hi): the key blocks a query tile sees, and those it sees entirely."""
    q_first = jnp.min(q_pos)
    q_last = jnp.minimum(jnp.max(q_pos), q_first + geo.T - 1)  # ignore padded rows
    return (*kv_block_range(q_first, q_last, bk=bk, nk=geo.S_pad // bk, static=static),
            *full_kv_block_range(q_first, q_last, bk=bk, S=geo.S, static=static))


def _tile_loop(step, carry, lo, hi, full_lo, full_hi, *, geo, static: Static, segmented: bool):
    """Runs step(index, carry, masked) over tiles lo..hi; the mask arithmetic only off [full_lo, full_hi].

    Three loops (before, inside, after the fully visible band), as the Triton fused-attention tutorial
    splits its off-diagonal and diagonal stages.
    """
    if segmented or not has_positional_mask(static, geo.S, geo.S_pad):
        return lax.fori_loop(lo, hi + 1, functools.partial(step, masked=segmented), carry)
    mid_lo = jnp.clip(full_lo, lo, hi + 1)
    mid_end = jnp.clip(full_hi + 1, mid_lo, hi + 1)
    carry = lax.fori_loop(lo, mid_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(mid_lo, mid_end, functools.partial(step, masked=False), carry)
    return lax.fori_loop(mid_end, hi + 1, functools.partial(step, masked=True), carry)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    B: int
    T: int
    S: int
    H: int
    G: int
    K: int
    Kp: int
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int
    T_pad: int
    S_pad: int
    num_warps: int

    @classmethod
    def of(cls, q_BTHK, k_BSGK, static: Static) -> _Geometry:
        B, T, H, K = q_BTHK.shape
        S, G = k_BSGK.shape[1], k_BSGK.shape[2]
        blocks = static.blocks
        for name, size in (("block_q", blocks.block_q), ("block_kv", blocks.block_kv),
                           ("block_q_bwd", blocks.q_bwd), ("block_kv_bwd", blocks.kv_bwd)):
            if size < 16 or size & (size - 1):
                raise ValueError(f"attention(impl='pallas_gpu'): BlockSizes.{name}={size} must be a power of two >= 16")
        fit = lambda block, n: min(block, max(16, pl.next_power_of_2(n)))  # noqa: E731
        bq, bq_bwd = fit(blocks.block_q, T), fit(blocks.q_bwd, T)
        bk, bk_bwd = fit(blocks.block_kv, S), fit(blocks.kv_bwd, S)
        Kp = max(16, pl.next_power_of_2(K))
        T_pad = round_up(T, max(bq, bq_bwd))  # powers of two: the larger is a multiple of the smaller
        S_pad = round_up(S, max(bk, bk_bwd))
        return cls(B, T, S, H, G, K, Kp, bq, bk, bq_bwd, bk_bwd, T_pad, S_pad, num_warps=4 if Kp <= 64 else 8)


def _pad(x_BLNK, L_pad: int, Kp: int):
    B, L, N, K = x_BLNK.shape
    if L_pad == L and Kp == K:
        return x_BLNK
    return jnp.pad(x_BLNK, ((0, 0), (0, L_pad - L), (0, 0), (0, Kp - K)))


def _pad_seg(seg_BL, L_pad: int):
    return jnp.pad(seg_BL.astype(jnp.int32), ((0, 0), (0, L_pad - seg_BL.shape[1])))


def _positions(q_offset, geo: _Geometry):
    """Key index of every (padded) query row: q_offset + t."""
    return jnp.asarray(q_offset, jnp.int32) + jnp.arange(geo.T_pad, dtype=jnp.int32)
