"""Pallas GPU (Triton) backend for target-token log-probs: a split-vocabulary forward kernel, and a
backward that recomputes dz one vocabulary chunk at a time in a kernel and leaves the two big matmuls
to XLA (cuBLAS, or XLA's own autotuned GEMM).

Triton keeps a tile in registers, so D is walked in chunks of block_d inside every logits tile:
z[n, v] = sum_k h[n, k] @ w[k, v]. Loads past the array edges are masked to zero (no input is padded)
and stores past them are masked off. Deterministic: no atomics, and no kernel reads what it wrote.

Forward, grid (vocab splits, token blocks): program (j, i) sweeps its own contiguous range of vocab
blocks for token block i with an online max / sum-exp / entropy accumulator in registers (the target
logit is picked with a column iota) and writes its partial (m, l, s, tgt) to float32 [n_split, N]
outputs; `_combine_splits` merges them in jnp with the rescaling of `online_update`. The split count is
static (`vocab_splits`): about `_MIN_PROGRAMS` programs in all (N=4096: 32 splits x 32 token blocks,
where one program per token block would leave most of a 132-SM GPU idle), never an empty split.
The split index is the fastest grid axis, so a wave of programs holds few token blocks, whose rows of
h stay in L2 over the sweep while each tile of w serves all of them. At N=16384, D=2048, V=131072
(bf16, 128 x 128 tiles, one 8-warp program per SM) the ~132 resident programs span 8 splits x ~16 token
blocks, so HBM sees h about once and w about N / (16 * 128) = 8 times (~5 GB).

Backward, per vocabulary chunk of chunk_v columns (a `fori_loop` over the full chunks, then one static
tail chunk of V % chunk_v columns; w is sliced, never padded):
  dz_Nc = kernel(h, w_Dc, targets - start, lse, entropy, cotangents)   grid (vocab blocks, token blocks)
  dh_ND += dz_Nc @ w_Dc^T                                   XLA dot, float32 accumulator
  dw_Dc  = h_ND^T @ dz_Nc                                   XLA dot, cast, written into the [D, V] result
`BlockSizes.for_gpu` sizes the chunk so that w_Dc (D * chunk_v * itemsize, 32 MiB) stays in L2 while the
dz kernel walks the token blocks (vocab blocks are its fastest grid axis). HBM traffic at the shape
above: dz written once and read by the two matmuls (3 * N * V * 2 B = 13 GB), the float32 dh read and
written per chunk (4 GB), h twice per chunk (2 GB), w and dw once (1 GB): ~20 GB, where the previous
kernels read-modify-wrote float32 accumulators in HBM once per tile (~550 GB). Compute: four matmuls
of 2 N D V flops (forward, recompute, dh, dw) against three for the naive path.
Temporaries: dz [N, chunk_v] in the input dtype, the float32 dh accumulator [N, D], one chunk of w
(and of dw before its cast) [D, chunk_v]: O(N * chunk_v + N * D + D * chunk_v), never O(N * V) and no
float32 [D, V].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from polmjax.kernels.backends import triton_dot_precision
from polmjax.kernels.logprobs.reference import (
    MASKED,
    finalize_stats,
    logits_grad,
    online_update,
    scale_logits,
)

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b

# The forward splits the vocabulary until the grid has about this many programs (if V allows).
_MIN_PROGRAMS = 1024


def forward_stats(h_ND, w_DV, t_N, *, temperature, softcap, with_entropy, blocks, interpret=False):
    """Per-token (lse_N, tgt_N, entropy_N or None), float32. Targets outside [0, V) give tgt = 0."""
    N, D = h_ND.shape
    V = w_DV.shape[1]
    tiles = _tiles(N, D, V, blocks.block_n, blocks.block_v, blocks.block_d)
    n_split, per_split = vocab_splits(N, V, tiles.bn, tiles.bv)
    n_out = 4 if with_entropy else 3
    kernel = functools.partial(_fwd_kernel, tiles=tiles, per_split=per_split, temperature=temperature,
                               softcap=softcap, with_entropy=with_entropy,
                               precision=triton_dot_precision(h_ND.dtype, interpret))
    outs = pl.pallas_call(
        kernel,
        grid=(n_split, pl.cdiv(N, tiles.bn)),
        out_shape=[jax.ShapeDtypeStruct((n_split, N), jnp.float32)] * n_out,
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name="polmjax_logprobs_fwd",
    )(t_N, h_ND, w_DV)
    return _combine_splits(*outs[:3], outs[3] if with_entropy else None)


def backward(h_ND, w_DV, t_N, lse_N, ent_N, g_lp_N, g_ent_N, *, temperature, softcap, blocks,
             interpret=False):
    """(dh_ND, dw_DV) in the input dtypes. g_ent_N=None: entropy was not an output."""
    N, D = h_ND.shape
    V = w_DV.shape[1]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    stats = [f32(lse_N), f32(g_lp_N)] + ([f32(ent_N), f32(g_ent_N)] if g_ent_N is not None else [])
    dz_fn = functools.partial(_dz, temperature=temperature, softcap=softcap, blocks=blocks,
                              interpret=interpret)
    c = min(blocks.chunk_v, V)
    n_full, tail = divmod(V, c)

    def chunk(carry, start, width):
        dh_ND, dw_DV_acc = carry
        w_Dc = jax.lax.dynamic_slice_in_dim(w_DV, start, width, axis=1)
        # Shifted targets: an id outside [start, start + width) falls outside [0, width) and hits nothing.
        dz_Nc = dz_fn(h_ND, w_Dc, t_N - start, stats)
        dh_ND = dh_ND + jax.lax.dot_general(dz_Nc, w_Dc, _NT, precision=triton_dot_precision(dz_Nc.dtype, interpret),
                                            preferred_element_type=jnp.float32)
        dw_Dc = jax.lax.dot_general(h_ND, dz_Nc, _TN, precision=triton_dot_precision(dz_Nc.dtype, interpret),
                                    preferred_element_type=jnp.float32)
        return dh_ND, jax.lax.dynamic_update_slice_in_dim(dw_DV_acc, dw_Dc.astype(w_DV.dtype), start, axis=1)

    carry = (jnp.zeros((N, D), jnp.float32), jnp.zeros_like(w_DV))
    if n_full == 1:
        carry = chunk(carry, 0, c)
    else:
        carry = jax.lax.fori_loop(0, n_full, lambda k, carry: chunk(carry, k * c, c), carry)
    if tail:
        carry = chunk(carry, n_full * c, tail)
    dh_ND, dw_DV_acc = carry
    return dh_ND.astype(h_ND.dtype), dw_DV_acc


def vocab_splits(N, V, bn, bv):
    """(n_split, vocab blocks per split) for the forward grid (n_split, cdiv(N, bn)).

    Enough splits for ~_MIN_PROGRAMS programs, at most one per vocab block; the per-split count is
    rounded up and the split count recomputed from it, so every split has at least one vocab block.
    """
    n_vb = pl.cdiv(V, bv)
    want = min(n_vb, max(1, pl.cdiv(_MIN_PROGRAMS, pl.cdiv(N, bn))))
    per_split = pl.cdiv(n_vb, want)
    return pl.cdiv(n_vb, per_split), per_split


# ----------------------------------------------------------------------------- split combination


def _combine_splits(m_SN, l_SN, tgt_SN, s_SN):
    """Merge per-split online statistics (each relative to its own max m_s) into (lse, tgt, entropy).

    With M = max_s m_s and alpha_s = exp(m_s - M): l = sum_s alpha_s l_s and
    s = sum_s alpha_s (s_s + (m_s - M) l_s), the rescaling `online_update` applies on a max change.
    """
    m_1N = jnp.max(m_SN, axis=0, keepdims=True)
    alpha_SN = jnp.exp(m_SN - m_1N)
    l_N = jnp.sum(alpha_SN * l_SN, axis=0)
    tgt_N = jnp.sum(tgt_SN, axis=0)
    if s_SN is None:
        return m_1N[0] + jnp.log(l_N), tgt_N, None
    s_N = jnp.sum(alpha_SN * (s_SN + (m_SN - m_1N) * l_SN), axis=0)
    lse_N, ent_N = finalize_stats(m_1N[0], l_N, s_N)
    return lse_N, tgt_N, ent_N


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(t_ref, h_ref, w_ref, m_ref, l_ref, tgt_ref, *s_ref, tiles, per_split, temperature,
                softcap, with_entropy, precision):
    T = tiles
    split = pl.program_id(0)
    row0 = pl.program_id(1) * T.bn
    row_ok = _ok(row0, T.bn, T.N)
    t = _load_rows(t_ref, row0, T.bn, row_ok)
    n_vb = pl.cdiv(T.V, T.bv)
    first = split * per_split
    n_steps = per_split if n_vb % per_split == 0 else jnp.minimum(per_split, n_vb - first)

    def v_step(j, carry):
        m, l, s, tgt = carry
        col0 = (first + j) * T.bv
        a = scale_logits(_logits(h_ref, w_ref, row0, col0, T, precision), temperature, softcap)
        cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, T.bv), 1)
        hit = cols == t
        if T.V % T.bv:  # padded columns of the last block: no mass, and no target at or past V hits them
            valid = cols < T.V
            a, hit = jnp.where(valid, a, MASKED), hit & valid
        tgt = tgt + jnp.sum(jnp.where(hit, a, 0.0), axis=1, keepdims=True)
        m, l, s = online_update(m, l, s, a, with_entropy)
        return m, l, s, tgt

    zeros = jnp.zeros((T.bn, 1), jnp.float32)
    init = (jnp.full((T.bn, 1), MASKED, jnp.float32), zeros, zeros, zeros)
    m, l, s, tgt = jax.lax.fori_loop(0, n_steps, v_step, init)
    for ref, x in ((m_ref, m), (l_ref, l), (tgt_ref, tgt)) + (((s_ref[0], s),) if with_entropy else ()):
        plgpu.store(ref.at[split, pl.ds(row0, T.bn)], x.reshape(T.bn), mask=row_ok)


def _dz(h_ND, w_Dc, t_N, stats, *, temperature, softcap, blocks, interpret):
    """dz [N, C] in w's dtype for one vocabulary chunk w_Dc (targets relative to the chunk)."""
    N, D = h_ND.shape
    C = w_Dc.shape[1]
    tiles = _tiles(N, D, C, blocks.block_n_dz, blocks.block_v_dz, blocks.block_d, ("block_n_dz", "block_v_dz"))
    kernel = functools.partial(_dz_kernel, tiles=tiles, temperature=temperature, softcap=softcap,
                               with_entropy=len(stats) == 4, precision=triton_dot_precision(h_ND.dtype, interpret))
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(C, tiles.bv), pl.cdiv(N, tiles.bn)),
        out_shape=jax.ShapeDtypeStruct((N, C), w_Dc.dtype),
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name="polmjax_logprobs_dz",
    )(t_N, *stats, h_ND, w_Dc)


def _dz_kernel(*refs, tiles, temperature, softcap, with_entropy, precision):
    *row_refs, h_ref, w_ref, dz_ref = refs
    T = tiles
    col0, row0 = pl.program_id(0) * T.bv, pl.program_id(1) * T.bn
    row_ok, col_ok = _ok(row0, T.bn, T.N), _ok(col0, T.bv, T.V)
    stats = [_load_rows(r, row0, T.bn, row_ok) for r in row_refs]
    if with_entropy:
        t, lse, g_lp, ent, g_ent = stats
    else:
        (t, lse, g_lp), ent, g_ent = stats, None, None
    a = scale_logits(_logits(h_ref, w_ref, row0, col0, T, precision), temperature, softcap)
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, T.bv), 1)
    dz = logits_grad(a, cols == t, lse, ent, g_lp, g_ent, temperature=temperature, softcap=softcap)
    # Padded rows and columns (finite garbage: their loads read zeros) are not stored.
    plgpu.store(dz_ref.at[pl.ds(row0, T.bn), pl.ds(col0, T.bv)], dz.astype(dz_ref.dtype),
                mask=_mask2(row_ok, col_ok))


# ----------------------------------------------------------------------------- tile helpers


class _Tiles(NamedTuple):
    """Static problem and tile sizes (Triton needs power-of-two tiles, >= 16 for a dot)."""

    N: int
    D: int
    V: int
    bn: int
    bv: int
    bd: int


def _tiles(N, D, V, bn, bv, bd, names=("block_n", "block_v")):
    for name, b in ((names[0], bn), (names[1], bv), ("block_d", bd)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"token_logprobs (pallas_gpu): {name}={b} must be a power of two >= 16")
    fit = lambda b, size: max(16, min(b, pl.next_power_of_2(size)))  # noqa: E731
    return _Tiles(N, D, V, fit(bn, N), fit(bv, V), fit(bd, D))


def _compiler_params(T):
    """8 warps for float32 logits tiles of 64 x 128 and up (at 4 warps the 64 x 128 bf16 dz tile with
    entropy and soft-cap needs all 255 registers), 4 below; the D loop is software-pipelined over 3
    stages of shared memory."""
    return plgpu.CompilerParams(num_warps=8 if T.bn * T.bv >= 64 * 128 else 4, num_stages=3)


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


def _load(ref, mask):
    """ref[...] with zeros where mask is False. Triton takes `other` only together with a mask (the
    interpreter accepts both, so only a real GPU lowering catches `other` without one)."""
    return plgpu.load(ref, mask=mask, other=None if mask is None else jnp.zeros((), ref.dtype))


def _load_rows(ref, row0, bn, row_ok):
    return _load(ref.at[pl.ds(row0, bn)], row_ok).reshape(bn, 1)


def _logits(h_ref, w_ref, row0, col0, T, precision):
    """z [bn, bv] float32 = h[row0:, :] @ w[:, col0:], D in chunks of bd; out-of-bounds reads are 0.
    precision: `_precision` of the input dtype."""
    row_ok, col_ok = _ok(row0, T.bn, T.N), _ok(col0, T.bv, T.V)

    def k_step(k, acc):
        k0 = k * T.bd
        k_ok = _ok(k0, T.bd, T.D)
        h = _load(h_ref.at[pl.ds(row0, T.bn), pl.ds(k0, T.bd)], _mask2(row_ok, k_ok))
        w = _load(w_ref.at[pl.ds(k0, T.bd), pl.ds(col0, T.bv)], _mask2(k_ok, col_ok))
        return acc + jnp.dot(h, w, precision=precision, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, pl.cdiv(T.D, T.bd), k_step, jnp.zeros((T.bn, T.bv), jnp.float32))
