"""FlashAttention for TPU in Pallas (Mosaic): a forward kernel and two backward kernels (dq, dk/dv).

Layout. Head dims that are multiples of 128 use the free view [B, T, H*K]: a (block, K) tile at lane
offset h*K is a plain strided DMA, so q/k/v/out are never transposed. Other head dims are transposed
to [B, H, T, K] around the kernels. K/V are never repeated for GQA: the kv tile of query head h is
kv head h // R (R = H // G) in the BlockSpec index map.

Grids. forward and dq: (B, H, query blocks, key blocks), the key axis sequential with float32 VMEM
accumulators. dk/dv: (B, G, key blocks, R, query blocks): the R query heads of one kv head and all
query blocks accumulate into one dk/dv tile, written once.

Masking. Causal / window / segment / padding masks are built per tile from iotas; tiles that no
query may see are neither computed (`pl.when`) nor fetched (their index map repeats the previous
block, so Pallas skips the DMA). Tiles that every query sees fully skip the mask arithmetic. The key
offset of query 0 (`q_offset`, possibly traced) arrives by scalar prefetch.

Per-row statistics are kept lane-replicated ([rows, 128]) in VMEM; the logsumexp goes to HBM as
[B, H, 8, T] (sublane-replicated rows, the layout the dk/dv kernel reads).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from polmjax.kernels.attention.flash import (
    MASK_VALUE,
    Static,
    full_kv_block_range,
    full_q_block_range,
    has_positional_mask,
    kv_block_range,
    lcm,
    q_block_range,
    round_up,
)

LANES = 128
SUBLANES = 8
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def forward(q_BTHK, k_BSGK, v_BSGK, q_seg_BT, kv_seg_BS, q_offset, static: Static):
    """Returns (out_BTHK, lse_BH8T): the output and the float32 logsumexp rows (padded length)."""
    geo = _Geometry.of(q_BTHK, k_BSGK, static)
    q = _to_kernel(q_BTHK, geo.T_pad, geo.flat)
    k = _to_kernel(k_BSGK, geo.S_pad, geo.flat)
    v = _to_kernel(v_BSGK, geo.S_pad, geo.flat)
    segs = _segments(q_seg_BT, kv_seg_BS, geo)
    bq, bk, nq, nk = geo.bq, geo.bk, geo.T_pad // geo.bq, geo.S_pad // geo.bk
    R = geo.H // geo.G

    def kv_index(b, h, i, j, off_ref):
        return b, h // R, _clamp_kv(i, j, off_ref[0], geo, bq, bk, static)

    def q_index(b, h, i, j, off_ref):
        return b, h, i

    in_specs = [
        _tile_spec(geo, bq, q_index),
        _tile_spec(geo, bk, kv_index),
        _tile_spec(geo, bk, kv_index),
    ]
    inputs = [q, k, v]
    if segs is not None:
        in_specs += [
            pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, off: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j, off: (b, 0, kv_index(b, h, i, j, off)[2])),
        ]
        inputs += [segs.q_cols, segs.kv_rows]
    out_specs = [
        _tile_spec(geo, bq, q_index),
        pl.BlockSpec((None, None, SUBLANES, bq), lambda b, h, i, j, off: (b, h, 0, i)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((geo.B, geo.H, SUBLANES, geo.T_pad), jnp.float32),
    ]
    kernel = functools.partial(_fwd_kernel, geo=geo, static=static, segmented=segs is not None)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(geo.B, geo.H, nq, nk),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((bq, LANES), jnp.float32),  # running max m
                pltpu.VMEM((bq, LANES), jnp.float32),  # running sum l
                pltpu.VMEM((bq, geo.K), jnp.float32),  # unnormalised output
            ],
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        ),
        cost_estimate=_cost(geo, static, passes=2),
        interpret=static.interpret,
        name="polmjax_flash_fwd",
    )(_offset_array(q_offset), *inputs)
    return _from_kernel(out, geo.B, geo.T, geo.H, geo.K, geo.flat), lse


def backward(q_BTHK, k_BSGK, v_BSGK, q_seg_BT, kv_seg_BS, q_offset, di_BHT, lse_BH8T, dout_BTHK,
             static: Static):
    """FlashAttention-2 backward: dq from a dq kernel, dk/dv from a dk/dv kernel. Returns (dq, dk, dv)."""
    geo = _Geometry.of(q_BTHK, k_BSGK, static)
    di_BHT = jnp.pad(di_BHT, ((0, 0), (0, 0), (0, geo.T_pad - geo.T)))
    q = _to_kernel(q_BTHK, geo.T_pad, geo.flat)
    do = _to_kernel(dout_BTHK.astype(q_BTHK.dtype), geo.T_pad, geo.flat)
    k = _to_kernel(k_BSGK, geo.S_pad, geo.flat)
    v = _to_kernel(v_BSGK, geo.S_pad, geo.flat)
    segs = _segments(q_seg_BT, kv_seg_BS, geo)
    offset = _offset_array(q_offset)
    dq = _backward_dq(q, k, v, do, lse_BH8T[:, :, :1], di_BHT[:, :, None], segs, offset, geo, static)
    di_BH8T = jnp.broadcast_to(di_BHT[:, :, None], lse_BH8T.shape)
    dk, dv = _backward_dkv(q, k, v, do, lse_BH8T, di_BH8T, segs, offset, geo, static)
    return (
        _from_kernel(dq, geo.B, geo.T, geo.H, geo.K, geo.flat),
        _from_kernel(dk, geo.B, geo.S, geo.G, geo.K, geo.flat),
        _from_kernel(dv, geo.B, geo.S, geo.G, geo.K, geo.flat),
    )


# Kernels ------------------------------------------------------------------------------------------


def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, *refs, geo, static, segmented):
    if segmented:
        qseg_ref, kvseg_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        (o_ref, lse_ref, m_ref, l_ref, acc_ref), qseg_ref, kvseg_ref = refs, None, None
    bq, bk = geo.bq, geo.bk
    i, j = pl.program_id(2), pl.program_id(3)
    q_first, k_first = off_ref[0] + i * bq, j * bk

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked: bool):
        s, _ = _logits(q_ref[...], k_ref[...], _NT, static)  # [bq, bk]
        mask = None
        if masked:
            seg = _segment_mask(qseg_ref, kvseg_ref, bk) if segmented else None
            mask = _tile_mask(q_first, k_first, (bq, bk), 0, geo, static, seg)
            if mask is not None:
                s = jnp.where(mask, s, MASK_VALUE)
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - jnp.tile(m_next, (1, bk // LANES)))
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        m_ref[...] = m_next
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        acc_ref[...] = acc_ref[...] * _lanes_to(alpha, geo.K) + pv

    _run_tile(step, _kv_tile_state(i, j, off_ref[0], geo, bq, bk, static), segmented)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l, m = l_ref[...], m_ref[...]
        inv = jnp.where(l == 0.0, 0.0, 1.0 / jnp.where(l == 0.0, 1.0, l))
        o_ref[...] = (acc_ref[...] * _lanes_to(inv, geo.K)).astype(o_ref.dtype)
        # Rows that see no key get lse = +inf, so the backward's exp(s - lse) is exactly 0 for them.
        lse = jnp.where(l == 0.0, jnp.inf, m + jnp.log(jnp.where(l == 0.0, 1.0, l)))  # [bq, 128]
        lse_ref[...] = lse.T[:SUBLANES, :]


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, geo, static, segmented):
    if segmented:
        qseg_ref, kvseg_ref, dq_ref, acc_ref = refs
    else:
        (dq_ref, acc_ref), qseg_ref, kvseg_ref = refs, None, None
    bq, bk = geo.bq_bwd, geo.bk_bwd
    i, j = pl.program_id(2), pl.program_id(3)
    q_first, k_first = off_ref[0] + i * bq, j * bk

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked: bool):
        k, v, do = k_ref[...], v_ref[...], do_ref[...]
        s, tanh = _logits(q_ref[...], k, _NT, static)  # [bq, bk]
        p = jnp.exp(s - jnp.expand_dims(lse_ref[0], 1))
        if masked:
            seg = _segment_mask(qseg_ref, kvseg_ref, bk) if segmented else None
            mask = _tile_mask(q_first, k_first, (bq, bk), 0, geo, static, seg)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.expand_dims(di_ref[0], 1))
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        acc_ref[...] += lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)

    _run_tile(step, _kv_tile_state(i, j, off_ref[0], geo, bq, bk, static), segmented)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * static.scale).astype(dq_ref.dtype)


def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, geo, static, segmented):
    if segmented:
        qseg_ref, kvseg_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    else:
        (dk_ref, dv_ref, dk_acc, dv_acc), qseg_ref, kvseg_ref = refs, None, None
    bq, bk = geo.bq_bwd, geo.bk_bwd
    j, r, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    q_first, k_first = off_ref[0] + i * bq, j * bk

    @pl.when((r == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked: bool):
        q, v, do = q_ref[...], v_ref[...], do_ref[...]
        s_t, tanh_t = _logits(k_ref[...], q, _NT, static)  # transposed tile [bk, bq]: keys on sublanes
        p_t = jnp.exp(s_t - lse_ref[:1, :])
        if masked:
            seg = _segment_mask(kvseg_ref, qseg_ref, bq) if segmented else None
            mask = _tile_mask(q_first, k_first, (bk, bq), 1, geo, static, seg)
            if mask is not None:
                p_t = jnp.where(mask, p_t, 0.0)
        dv_acc[...] += lax.dot_general(p_t.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - di_ref[:1, :])
        if tanh_t is not None:
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        dk_acc[...] += lax.dot_general(ds_t.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32)

    _run_tile(step, _q_tile_state(j, i, off_ref[0], geo, bq, bk, static), segmented)

    @pl.when((r == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_acc[...] * static.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _logits(a, b, dims, static: Static):
    """scale * a b^T in float32, soft-capped; also tanh(logits / softcap) for the backward's chain rule."""
    s = lax.dot_general(a, b, dims, preferred_element_type=jnp.float32) * jnp.float32(static.scale)
    if static.softcap is None:
        return s, None
    tanh = jnp.tanh(s * jnp.float32(1.0 / static.softcap))
    return tanh * jnp.float32(static.softcap), tanh


def _run_tile(step, state, segmented: bool):
    """Runs step(masked=...) on a visible tile; the mask arithmetic only where some pair is masked."""
    visible, full = state
    if segmented or full is None:
        pl.when(visible)(lambda: step(masked=segmented))
        return
    pl.when(visible & full)(lambda: step(masked=False))
    pl.when(visible & jnp.logical_not(full))(lambda: step(masked=True))


def _segment_mask(rows_ref, cols_ref, cols: int):
    """Same-segment mask of a tile: row ids [rows, 128] (lane-replicated) against column ids [8, cols]."""
    return jnp.tile(rows_ref[...], (1, cols // LANES)) == cols_ref[:1, :]


def _tile_mask(q_first, k_first, shape, q_axis: int, geo, static: Static, seg=None):
    """Mask of one tile (causal, window, key padding, and `seg`, a same-segment mask), or None when there
    is none."""
    q_pos = q_first + lax.broadcasted_iota(jnp.int32, shape, q_axis)
    k_pos = k_first + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
    mask = seg

    def add(cond):
        nonlocal mask
        mask = cond if mask is None else mask & cond

    if static.causal:
        add(k_pos <= q_pos)
    if static.window is not None:
        add(q_pos - k_pos < static.window)
        if not static.causal:
            add(k_pos - q_pos < static.window)
    if geo.S_pad != geo.S:
        add(k_pos < geo.S)
    return mask


def _kv_tile_state(i, j, off, geo, bq, bk, static):
    """(visible, fully visible or None) of tile (query block i, key block j); None: no positional mask."""
    q_first = off + i * bq
    q_last = off + jnp.minimum(i * bq + bq, geo.T) - 1
    lo, hi = kv_block_range(q_first, q_last, bk=bk, nk=geo.S_pad // bk, static=static)
    visible = (lo <= j) & (j <= hi)
    if not has_positional_mask(static, geo.S, geo.S_pad):
        return visible, None
    full_lo, full_hi = full_kv_block_range(q_first, q_last, bk=bk, S=geo.S, static=static)
    return visible, (full_lo <= j) & (j <= full_hi)


def _q_tile_state(j, i, off, geo, bq, bk, static):
    """(visible, fully visible or None) of tile (key block j, query block i)."""
    k_first, k_last = j * bk, jnp.minimum(j * bk + bk, geo.S) - 1
    nq = -(-geo.T // bq)
    lo, hi = q_block_range(k_first, k_last, off, bq=bq, nq=nq, static=static)
    visible = (lo <= i) & (i <= hi)
    if not has_positional_mask(static, geo.S, geo.S_pad):
        return visible, None
    full_lo, full_hi = full_q_block_range(k_first, j * bk + bk - 1, off, bq=bq, nq=nq, S=geo.S, static=static)
    return visible, (full_lo <= i) & (i <= full_hi)


def _clamp_kv(i, j, off, geo, bq, bk, static):
    """Key block to fetch at grid step (i, j): j inside the visible range, else its nearest end.

    Skipped steps thus repeat an already fetched block and Pallas issues no DMA for them.
    """
    q_first = off + i * bq
    q_last = off + jnp.minimum(i * bq + bq, geo.T) - 1
    nk = geo.S_pad // bk
    lo, hi = kv_block_range(q_first, q_last, bk=bk, nk=nk, static=static)
    return jnp.clip(jnp.clip(j, lo, hi), 0, nk - 1)


def _clamp_q(j, i, off, geo, bq, bk, static):
    k_first, k_last = j * bk, jnp.minimum(j * bk + bk, geo.S) - 1
    nq = -(-geo.T // bq)  # query blocks holding real rows
    lo, hi = q_block_range(k_first, k_last, off, bq=bq, nq=nq, static=static)
    return jnp.clip(jnp.clip(i, lo, hi), 0, nq - 1)


def _lanes_to(x_R128, width: int):
    """A lane-replicated [rows, 128] statistic widened (or cut) to [rows, width]."""
    reps = -(-width // LANES)
    x = jnp.tile(x_R128, (1, reps)) if reps > 1 else x_R128
    return x if x.shape[1] == width else x[:, :width]


# Backward pallas_calls ----------------------------------------------------------------------------


def _backward_dq(q, k, v, do, lse_BH1T, di_BH1T, segs, offset, geo, static):
    bq, bk = geo.bq_bwd, geo.bk_bwd
    nq, nk = geo.T_pad // bq, geo.S_pad // bk
    R = geo.H // geo.G

    def q_index(b, h, i, j, off):
        return b, h, i

    def kv_index(b, h, i, j, off):
        return b, h // R, _clamp_kv(i, j, off[0], geo, bq, bk, static)

    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, off: (b, h, 0, i))
    in_specs = [_tile_spec(geo, bq, q_index), _tile_spec(geo, bk, kv_index), _tile_spec(geo, bk, kv_index),
                _tile_spec(geo, bq, q_index), row_spec, row_spec]
    inputs = [q, k, v, do, lse_BH1T, di_BH1T]
    if segs is not None:
        in_specs += [
            pl.BlockSpec((None, bq, LANES), lambda b, h, i, j, off: (b, i, 0)),
            pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j, off: (b, 0, kv_index(b, h, i, j, off)[2])),
        ]
        inputs += [segs.q_cols, segs.kv_rows]
    kernel = functools.partial(_dq_kernel, geo=geo, static=static, segmented=segs is not None)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(geo.B, geo.H, nq, nk),
            in_specs=in_specs,
            out_specs=_tile_spec(geo, bq, q_index),
            scratch_shapes=[pltpu.VMEM((bq, geo.K), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        ),
        cost_estimate=_cost(geo, static, passes=3),
        interpret=static.interpret,
        name="polmjax_flash_dq",
    )(offset, *inputs)


def _backward_dkv(q, k, v, do, lse_BH8T, di_BH8T, segs, offset, geo, static):
    bq, bk = geo.bq_bwd, geo.bk_bwd
    nq, nk = geo.T_pad // bq, geo.S_pad // bk
    R = geo.H // geo.G

    def q_block(b, g, j, r, i, off):
        return _clamp_q(j, i, off[0], geo, bq, bk, static)

    def q_index(b, g, j, r, i, off):
        return b, g * R + r, q_block(b, g, j, r, i, off)

    def kv_index(b, g, j, r, i, off):
        return b, g, j

    row_spec = pl.BlockSpec(
        (None, None, SUBLANES, bq), lambda b, g, j, r, i, off: (b, g * R + r, 0, q_block(b, g, j, r, i, off))
    )
    in_specs = [_tile_spec(geo, bq, q_index), _tile_spec(geo, bk, kv_index), _tile_spec(geo, bk, kv_index),
                _tile_spec(geo, bq, q_index), row_spec, row_spec]
    inputs = [q, k, v, do, lse_BH8T, di_BH8T]
    if segs is not None:
        in_specs += [
            pl.BlockSpec((None, SUBLANES, bq), lambda b, g, j, r, i, off: (b, 0, q_block(b, g, j, r, i, off))),
            pl.BlockSpec((None, bk, LANES), lambda b, g, j, r, i, off: (b, j, 0)),
        ]
        inputs += [segs.q_rows, segs.kv_cols]
    kernel = functools.partial(_dkv_kernel, geo=geo, static=static, segmented=segs is not None)
    kv_out = jax.ShapeDtypeStruct(k.shape, k.dtype)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(geo.B, geo.G, nk, R, nq),
            in_specs=in_specs,
            out_specs=[_tile_spec(geo, bk, kv_index), _tile_spec(geo, bk, kv_index)],
            scratch_shapes=[pltpu.VMEM((bk, geo.K), jnp.float32), pltpu.VMEM((bk, geo.K), jnp.float32)],
        ),
        out_shape=[kv_out, kv_out],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        ),
        cost_estimate=_cost(geo, static, passes=4),
        interpret=static.interpret,
        name="polmjax_flash_dkv",
    )(offset, *inputs)


# Geometry, layout and inputs ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Geometry:
    B: int
    T: int
    S: int
    H: int
    G: int
    K: int
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int
    T_pad: int
    S_pad: int
    flat: bool  # [B, T, H*K] view (K % 128 == 0) rather than [B, H, T, K]

    @classmethod
    def of(cls, q_BTHK, k_BSGK, static: Static) -> _Geometry:
        B, T, H, K = q_BTHK.shape
        S, G = k_BSGK.shape[1], k_BSGK.shape[2]
        blocks = static.blocks
        for name, size in (("block_q", blocks.block_q), ("block_kv", blocks.block_kv),
                           ("block_q_bwd", blocks.q_bwd), ("block_kv_bwd", blocks.kv_bwd)):
            if size % LANES:
                raise ValueError(f"attention(impl='pallas_tpu'): BlockSizes.{name}={size} must be a multiple of {LANES}")
        bq = min(blocks.block_q, round_up(T, LANES))
        bq_bwd = min(blocks.q_bwd, round_up(T, LANES))
        bk = min(blocks.block_kv, round_up(S, LANES))
        bk_bwd = min(blocks.kv_bwd, round_up(S, LANES))
        T_pad = round_up(T, lcm(bq, bq_bwd))
        S_pad = round_up(S, lcm(bk, bk_bwd))
        return cls(B, T, S, H, G, K, bq, bk, bq_bwd, bk_bwd, T_pad, S_pad, flat=K % LANES == 0)


def _to_kernel(x_BLNK, L_pad: int, flat: bool):
    B, L, N, K = x_BLNK.shape
    x = jnp.pad(x_BLNK, ((0, 0), (0, L_pad - L), (0, 0), (0, 0))) if L_pad != L else x_BLNK
    return x.reshape(B, L_pad, N * K) if flat else x.transpose(0, 2, 1, 3)


def _from_kernel(x, B: int, L: int, N: int, K: int, flat: bool):
    x_BLNK = x.reshape(B, -1, N, K) if flat else x.transpose(0, 2, 1, 3)
    return x_BLNK[:, :L]


def _tile_spec(geo: _Geometry, block_len: int, index):
    """BlockSpec of a (block_len, K) tile; index(*grid, off_ref) -> (batch, head, block)."""
    if geo.flat:
        return pl.BlockSpec((None, block_len, geo.K), lambda *a: _flat_index(index(*a)))
    return pl.BlockSpec((None, None, block_len, geo.K), lambda *a: (*index(*a), 0))


def _flat_index(bhl):
    b, h, l = bhl
    return b, l, h


@dataclasses.dataclass(frozen=True)
class _Segments:
    q_cols: jax.Array  # [B, T_pad, 128]: a query's id along lanes (forward, dq)
    kv_rows: jax.Array  # [B, 8, S_pad]: key ids along lanes (forward, dq)
    q_rows: jax.Array  # [B, 8, T_pad] (dk/dv)
    kv_cols: jax.Array  # [B, S_pad, 128] (dk/dv)


def _segments(q_seg_BT, kv_seg_BS, geo: _Geometry) -> _Segments | None:
    if q_seg_BT is None:
        return None
    q = jnp.pad(q_seg_BT.astype(jnp.int32), ((0, 0), (0, geo.T_pad - geo.T)))
    kv = jnp.pad(kv_seg_BS.astype(jnp.int32), ((0, 0), (0, geo.S_pad - geo.S)))
    return _Segments(
        q_cols=lax.broadcast_in_dim(q, (geo.B, geo.T_pad, LANES), (0, 1)),
        kv_rows=lax.broadcast_in_dim(kv, (geo.B, SUBLANES, geo.S_pad), (0, 2)),
        q_rows=lax.broadcast_in_dim(q, (geo.B, SUBLANES, geo.T_pad), (0, 2)),
        kv_cols=lax.broadcast_in_dim(kv, (geo.B, geo.S_pad, LANES), (0, 1)),
    )


def _offset_array(q_offset):
    return jnp.asarray(q_offset, jnp.int32).reshape(1)


def _cost(geo: _Geometry, static: Static, passes: int) -> pl.CostEstimate:
    """Rough cost for XLA's scheduler: `passes` [T, S, K] matmuls per head, halved when causal."""
    frac = 0.5 if static.causal else 1.0
    flops = int(2 * passes * geo.B * geo.H * geo.T * geo.S * geo.K * frac)
    itemsize = 2
    bytes_accessed = itemsize * geo.B * geo.K * (2 * geo.T * geo.H + 2 * geo.S * geo.G)
    return pl.CostEstimate(flops=flops, transcendentals=int(geo.B * geo.H * geo.T * geo.S * frac),
                           bytes_accessed=int(bytes_accessed))
