"""Pallas GPU (Triton) kernels for target-token log-probs: one forward, two backward kernels.

Triton keeps a tile in registers, so D is walked in chunks of block_d inside every logits tile:
z[n, v] = sum_k h[n, k] @ w[k, v]. Each program owns a block of rows (forward, d_hidden) or of vocab
columns (d_unembed) and loops over the other axis, so no two programs write the same address:
  * forward, grid (token blocks): sweep the vocabulary with an online max / sum-exp / entropy in
    registers; the target logit is picked with a column iota.
  * d_hidden, grid (token blocks): for each vocab block recompute dz, then dh[n, k] += dz @ w[k, v]^T
    for every D chunk k, read-modify-write of a float32 [N, D] buffer the program owns rows of.
  * d_unembed, grid (vocab blocks): for each token block recompute dz, then dw[k, v] += h[n, k]^T @ dz,
    read-modify-write of a float32 [D, V] buffer (cast to unembed's dtype afterwards). That buffer is
    the one O(D * V) temporary of this backend (none is O(N * V)).
Loads past the array edges are masked to zero, so edge tiles need no padding; dz is zeroed in the
padded vocab columns and token rows. Deterministic: no atomics.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from polmjax.kernels.logprobs.reference import (
    MASKED,
    finalize_stats,
    logits_grad,
    online_update,
    scale_logits,
)

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def forward_stats(h_ND, w_DV, t_N, *, temperature, softcap, with_entropy, blocks, interpret=False):
    """Per-token (lse_N, tgt_N, entropy_N or None), float32. Targets outside [0, V) give tgt = 0."""
    N, D = h_ND.shape
    V = w_DV.shape[1]
    tiles = _tiles(N, D, V, blocks.block_n, blocks.block_v, blocks.block_d)
    n_out = 3 if with_entropy else 2
    kernel = functools.partial(_fwd_kernel, tiles=tiles, temperature=temperature, softcap=softcap,
                               with_entropy=with_entropy)
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(N, tiles.bn),),
        out_shape=[jax.ShapeDtypeStruct((N,), jnp.float32)] * n_out,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="token_logprobs_fwd",
    )(t_N, h_ND, w_DV)
    return outs[0], outs[1], (outs[2] if with_entropy else None)


def backward(h_ND, w_DV, t_N, lse_N, ent_N, g_lp_N, g_ent_N, *, temperature, softcap, blocks,
             interpret=False):
    """(dh_ND, dw_DV) in the input dtypes. g_ent_N=None: entropy was not an output."""
    N, D = h_ND.shape
    V = w_DV.shape[1]
    with_entropy = g_ent_N is not None
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    rows = [t_N, f32(lse_N), f32(g_lp_N)] + ([f32(ent_N), f32(g_ent_N)] if with_entropy else [])
    # The interpreter has no barrier primitive and needs none (a program runs as one thread there).
    math = dict(temperature=temperature, softcap=softcap, with_entropy=with_entropy,
                barrier=not interpret)
    params = plgpu.CompilerParams(num_warps=4, num_stages=2)

    tiles = _tiles(N, D, V, blocks.block_n_dh, blocks.block_v_dh, blocks.block_d)
    dh_ND = pl.pallas_call(
        functools.partial(_dh_kernel, tiles=tiles, **math),
        grid=(pl.cdiv(N, tiles.bn),),
        out_shape=jax.ShapeDtypeStruct((N, D), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="token_logprobs_bwd_dhidden",
    )(*rows, h_ND, w_DV)

    tiles = _tiles(N, D, V, blocks.block_n_dw, blocks.block_v_dw, blocks.block_d)
    dw_DV = pl.pallas_call(
        functools.partial(_dw_kernel, tiles=tiles, **math),
        grid=(pl.cdiv(V, tiles.bv),),
        out_shape=jax.ShapeDtypeStruct((D, V), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="token_logprobs_bwd_dunembed",
    )(*rows, h_ND, w_DV)
    return dh_ND.astype(h_ND.dtype), dw_DV.astype(w_DV.dtype)


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(t_ref, h_ref, w_ref, lse_ref, tgt_ref, *ent_ref, tiles, temperature, softcap,
                with_entropy):
    T = tiles
    row0 = pl.program_id(0) * T.bn
    row_ok = _ok(row0, T.bn, T.N)
    t = _load_rows(t_ref, row0, T.bn, row_ok, 0)

    def v_step(j, carry):
        m, l, s, tgt = carry
        col0 = j * T.bv
        a = scale_logits(_logits(h_ref, w_ref, row0, col0, T), temperature, softcap)
        cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, T.bv), 1)
        valid = cols < T.V  # a target past V (another vocab shard's) must not hit a padded column
        a = jnp.where(valid, a, MASKED)
        tgt = tgt + jnp.sum(jnp.where((cols == t) & valid, a, 0.0), axis=1, keepdims=True)
        m, l, s = online_update(m, l, s, a, with_entropy)
        return m, l, s, tgt

    zeros = jnp.zeros((T.bn, 1), jnp.float32)
    init = (jnp.full((T.bn, 1), MASKED, jnp.float32), zeros, zeros, zeros)
    m, l, s, tgt = jax.lax.fori_loop(0, pl.cdiv(T.V, T.bv), v_step, init)
    lse, ent = finalize_stats(m, l, s)
    _store_rows(lse_ref, row0, lse, row_ok)
    _store_rows(tgt_ref, row0, tgt, row_ok)
    if with_entropy:
        _store_rows(ent_ref[0], row0, ent, row_ok)


def _dh_kernel(*refs, tiles, temperature, softcap, with_entropy, barrier):
    *row_refs, h_ref, w_ref, dh_ref = refs
    T = tiles
    row0 = pl.program_id(0) * T.bn
    row_ok = _ok(row0, T.bn, T.N)
    stats = [_load_rows(r, row0, T.bn, row_ok, 0) for r in row_refs]

    def v_step(j, carry):
        col0 = j * T.bv
        dz = _dlogits(stats, h_ref, w_ref, row0, col0, T, temperature, softcap, with_entropy)
        dz = dz.astype(w_ref.dtype)
        col_ok = _ok(col0, T.bv, T.V)

        def d_step(k, carry):
            k0 = k * T.bd
            k_ok = _ok(k0, T.bd, T.D)
            w = plgpu.load(w_ref.at[pl.ds(k0, T.bd), pl.ds(col0, T.bv)],
                           mask=_mask2(k_ok, col_ok), other=0.0)
            part = jax.lax.dot_general(dz, w, _NT, preferred_element_type=jnp.float32)
            _accumulate(dh_ref.at[pl.ds(row0, T.bn), pl.ds(k0, T.bd)], part, j == 0, _mask2(row_ok, k_ok))
            return carry

        jax.lax.fori_loop(0, pl.cdiv(T.D, T.bd), d_step, 0)
        if barrier:  # this program reads its own stores of dh in the next vocab block
            plgpu.debug_barrier()
        return carry

    jax.lax.fori_loop(0, pl.cdiv(T.V, T.bv), v_step, 0)


def _dw_kernel(*refs, tiles, temperature, softcap, with_entropy, barrier):
    *row_refs, h_ref, w_ref, dw_ref = refs
    T = tiles
    col0 = pl.program_id(0) * T.bv
    col_ok = _ok(col0, T.bv, T.V)

    def n_step(i, carry):
        row0 = i * T.bn
        row_ok = _ok(row0, T.bn, T.N)
        stats = [_load_rows(r, row0, T.bn, row_ok, 0) for r in row_refs]
        dz = _dlogits(stats, h_ref, w_ref, row0, col0, T, temperature, softcap, with_entropy)
        if row_ok is not None:
            dz = jnp.where(row_ok.reshape(T.bn, 1), dz, 0.0)
        dz = dz.astype(h_ref.dtype)

        def d_step(k, carry):
            k0 = k * T.bd
            k_ok = _ok(k0, T.bd, T.D)
            h = plgpu.load(h_ref.at[pl.ds(row0, T.bn), pl.ds(k0, T.bd)],
                           mask=_mask2(row_ok, k_ok), other=0.0)
            part = jax.lax.dot_general(h, dz, _TN, preferred_element_type=jnp.float32)
            _accumulate(dw_ref.at[pl.ds(k0, T.bd), pl.ds(col0, T.bv)], part, i == 0, _mask2(k_ok, col_ok))
            return carry

        jax.lax.fori_loop(0, pl.cdiv(T.D, T.bd), d_step, 0)
        if barrier:
            plgpu.debug_barrier()
        return carry

    jax.lax.fori_loop(0, pl.cdiv(T.N, T.bn), n_step, 0)


# ----------------------------------------------------------------------------- tile helpers


class _Tiles(NamedTuple):
    """Static problem and tile sizes (Triton needs power-of-two tiles, >= 16 for a dot)."""

    N: int
    D: int
    V: int
    bn: int
    bv: int
    bd: int


def _tiles(N, D, V, bn, bv, bd):
    for name, b in (("block_n", bn), ("block_v", bv), ("block_d", bd)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"token_logprobs (pallas_gpu): {name}={b} must be a power of two >= 16")
    fit = lambda b, size: max(16, min(b, pl.next_power_of_2(size)))  # noqa: E731
    return _Tiles(N, D, V, fit(bn, N), fit(bv, V), fit(bd, D))


def _ok(start, size, bound):
    """Mask of in-bounds indices start + [0, size) (None when every block is full)."""
    if bound % size == 0:
        return None
    return start + jnp.arange(size, dtype=jnp.int32) < bound


def _mask2(rows_ok, cols_ok):
    if rows_ok is None and cols_ok is None:
        return None
    r = rows_ok.reshape(-1, 1) if rows_ok is not None else None
    c = cols_ok.reshape(1, -1) if cols_ok is not None else None
    if r is None:
        return c
    if c is None:
        return r
    return r & c


def _load_rows(ref, row0, bn, row_ok, other):
    x = plgpu.load(ref.at[pl.ds(row0, bn)], mask=row_ok, other=None if row_ok is None else other)
    return x.reshape(bn, 1)


def _store_rows(ref, row0, x, row_ok):
    plgpu.store(ref.at[pl.ds(row0, x.shape[0])], x.reshape(x.shape[0]), mask=row_ok)


def _accumulate(ref, part, first, mask):
    """ref += part (ref := part on the first visit), only where mask."""
    old = plgpu.load(ref, mask=mask, other=None if mask is None else 0.0)
    plgpu.store(ref, jnp.where(first, part, old + part), mask=mask)


def _logits(h_ref, w_ref, row0, col0, T):
    """z [bn, bv] float32 = h[row0:, :] @ w[:, col0:], D in chunks of bd; out-of-bounds reads are 0."""
    row_ok, col_ok = _ok(row0, T.bn, T.N), _ok(col0, T.bv, T.V)

    def k_step(k, acc):
        k0 = k * T.bd
        k_ok = _ok(k0, T.bd, T.D)
        hm, wm = _mask2(row_ok, k_ok), _mask2(k_ok, col_ok)
        h = plgpu.load(h_ref.at[pl.ds(row0, T.bn), pl.ds(k0, T.bd)], mask=hm,
                       other=None if hm is None else 0.0)
        w = plgpu.load(w_ref.at[pl.ds(k0, T.bd), pl.ds(col0, T.bv)], mask=wm,
                       other=None if wm is None else 0.0)
        return acc + jnp.dot(h, w, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, pl.cdiv(T.D, T.bd), k_step, jnp.zeros((T.bn, T.bv), jnp.float32))


def _dlogits(stats, h_ref, w_ref, row0, col0, T, temperature, softcap, with_entropy):
    """dz [bn, bv] float32 for the tile at (row0, col0); zero in columns past V."""
    if with_entropy:
        t, lse, g_lp, ent, g_ent = stats
    else:
        (t, lse, g_lp), ent, g_ent = stats, None, None
    a = scale_logits(_logits(h_ref, w_ref, row0, col0, T), temperature, softcap)
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, T.bv), 1)
    dz = logits_grad(a, cols == t, lse, ent, g_lp, g_ent, temperature=temperature, softcap=softcap)
    if T.V % T.bv:
        dz = jnp.where(cols < T.V, dz, 0.0)
    return dz
