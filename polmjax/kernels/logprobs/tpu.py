"""Pallas TPU (Mosaic) kernels for target-token log-probs: one forward, two backward kernels.

Forward, grid (token blocks "parallel", vocab blocks "arbitrary"): each step computes one
[block_n, block_v] tile of logits on the MXU (float32 accumulation) and folds it into per-token
running max / sum-exp / entropy accumulators held in VMEM scratch; the target logit is picked by
comparing a column iota with the targets. Outputs per token: lse, target logit, entropy.

Backward, from the saved per-token lse (and entropy), recomputing each logits tile:
  * d_hidden kernel, grid (token blocks "parallel", vocab blocks "arbitrary"):
    dh[n] = sum_v dz[n, v] @ w[:, v]^T, a [block_n, D] float32 accumulator in VMEM.
  * d_unembed kernel, grid (vocab blocks "parallel", token blocks "arbitrary"):
    dw[:, v] = sum_n h[n]^T @ dz[n, v], a [D, block_v] float32 accumulator in VMEM.
The logits are recomputed once in each (five matmuls in all against three for the naive path) so that
neither kernel needs an HBM accumulator and both keep a "parallel" axis for megacore chips.

D is not tiled: a [block_n, D] tile of hidden and a [D, block_v] tile of unembed sit in VMEM.
`vmem_bytes` estimates a kernel's footprint; `polmjax.kernels.logprobs.ops.BlockSizes.for_tpu` picks
the largest tiles that fit the chip (D up to 16384 in bf16 fits every generation from v5e on).

N and V need not be multiples of the blocks: the grid is rounded up and the edge blocks read
unspecified values past the array end, which the kernels mask (padded vocab columns to MASKED in the
forward and to zero in the backward, padded token rows to zero where rows are summed over). Nothing is
padded or copied in HBM.

Per-token vectors travel as [N, 1] arrays (a lane-dense [1, N] layout would need in-kernel transposes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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
    bn, bv = _block(blocks.block_n, N, 16, "block_n"), _block(blocks.block_v, V, 128, "block_v")
    n_out = 3 if with_entropy else 2
    kernel = functools.partial(
        _fwd_kernel, V=V, temperature=temperature, softcap=softcap, with_entropy=with_entropy,
        precision=_precision(h_ND.dtype),
    )
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(N, bn), pl.cdiv(V, bv)),
        in_specs=[
            row,                                            # targets
            pl.BlockSpec((bn, D), lambda i, j: (i, 0)),     # hidden: resident over the vocab sweep
            pl.BlockSpec((D, bv), lambda i, j: (0, j)),     # unembed: streamed
        ],
        out_specs=[row] * n_out,
        out_shape=[jax.ShapeDtypeStruct((N, 1), jnp.float32)] * n_out,
        scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 4,  # max, sum-exp, entropy acc, target
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=blocks.vmem_limit_bytes
        ),
        cost_estimate=_cost(N, D, V, h_ND.dtype, matmuls=1, h_reads=1, w_reads=pl.cdiv(N, bn)),
        interpret=interpret,
        name="polmjax_logprobs_fwd",
    )(t_N.reshape(N, 1), h_ND, w_DV)
    lse_N, tgt_N = outs[0][:, 0], outs[1][:, 0]
    return lse_N, tgt_N, (outs[2][:, 0] if with_entropy else None)


def backward(h_ND, w_DV, t_N, lse_N, ent_N, g_lp_N, g_ent_N, *, temperature, softcap, blocks,
             interpret=False):
    """(dh_ND, dw_DV) in the input dtypes. g_ent_N=None: entropy was not an output."""
    N, D = h_ND.shape
    V = w_DV.shape[1]
    with_entropy = g_ent_N is not None
    col = lambda x: x.astype(jnp.float32).reshape(N, 1)  # noqa: E731
    rows = [t_N.reshape(N, 1), col(lse_N), col(g_lp_N)]
    if with_entropy:
        rows += [col(ent_N), col(g_ent_N)]
    math = dict(V=V, N=N, temperature=temperature, softcap=softcap, with_entropy=with_entropy,
                precision=_precision(h_ND.dtype))
    params = lambda sem: pltpu.CompilerParams(  # noqa: E731
        dimension_semantics=sem, vmem_limit_bytes=blocks.vmem_limit_bytes)

    # d_hidden: token blocks outer, vocab blocks inner (the reduction).
    bn, bv = _block(blocks.block_n_dh, N, 16, "block_n_dh"), _block(blocks.block_v_dh, V, 128, "block_v_dh")
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    dh_ND = pl.pallas_call(
        functools.partial(_dh_kernel, **math),
        grid=(pl.cdiv(N, bn), pl.cdiv(V, bv)),
        in_specs=[row] * len(rows) + [
            pl.BlockSpec((bn, D), lambda i, j: (i, 0)),
            pl.BlockSpec((D, bv), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bn, D), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((N, D), h_ND.dtype),
        scratch_shapes=[pltpu.VMEM((bn, D), jnp.float32)],
        compiler_params=params(("parallel", "arbitrary")),
        cost_estimate=_cost(N, D, V, h_ND.dtype, matmuls=2, h_reads=2, w_reads=pl.cdiv(N, bn)),
        interpret=interpret,
        name="polmjax_logprobs_dhidden",
    )(*rows, h_ND, w_DV)

    # d_unembed: vocab blocks outer, token blocks inner (the reduction).
    bn, bv = _block(blocks.block_n_dw, N, 16, "block_n_dw"), _block(blocks.block_v_dw, V, 128, "block_v_dw")
    row = pl.BlockSpec((bn, 1), lambda j, i: (i, 0))
    dw_DV = pl.pallas_call(
        functools.partial(_dw_kernel, **math),
        grid=(pl.cdiv(V, bv), pl.cdiv(N, bn)),
        in_specs=[row] * len(rows) + [
            pl.BlockSpec((bn, D), lambda j, i: (i, 0)),
            pl.BlockSpec((D, bv), lambda j, i: (0, j)),
        ],
        out_specs=pl.BlockSpec((D, bv), lambda j, i: (0, j)),
        out_shape=jax.ShapeDtypeStruct((D, V), w_DV.dtype),
        scratch_shapes=[pltpu.VMEM((D, bv), jnp.float32)],
        compiler_params=params(("parallel", "arbitrary")),
        cost_estimate=_cost(N, D, V, h_ND.dtype, matmuls=2, h_reads=pl.cdiv(V, bv), w_reads=2),
        interpret=interpret,
        name="polmjax_logprobs_dunembed",
    )(*rows, h_ND, w_DV)
    return dh_ND, dw_DV


def vmem_bytes(kernel: str, block_n: int, block_v: int, d_model: int, itemsize: int) -> int:
    """A deliberately generous estimate of one kernel's VMEM use ("fwd", "dh" or "dw").

    Double-buffered hidden and unembed tiles, ~6 float32 logits-sized temporaries, [block_n, 1]
    vectors (a (8, 128) tile per 8 rows), plus the float32 accumulator, the matmul result before it is
    added, the masked input tile and the double-buffered output tile of the backward kernels.
    """
    bn, bv, D = block_n, block_v, d_model
    h, w = bn * D * itemsize, D * bv * itemsize
    total = 2 * (h + w) + 6 * bn * bv * 4 + 16 * bn * 512
    if kernel == "dh":
        total += 2 * h + 2 * bn * D * 4 + w
    elif kernel == "dw":
        total += 2 * w + 2 * D * bv * 4 + h
    elif kernel != "fwd":
        raise ValueError(f"vmem_bytes: kernel must be 'fwd', 'dh' or 'dw', got {kernel!r}")
    return total


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(t_ref, h_ref, w_ref, lse_ref, tgt_ref, *rest, V, temperature, softcap, with_entropy,
                precision):
    ent_ref = rest[0] if with_entropy else None
    m_ref, l_ref, s_ref, acc_ref = rest[-4:]
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    z = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32, precision=precision)
    a = scale_logits(z, temperature, softcap)
    cols = _cols(j, a.shape)
    hit = cols == t_ref[...]
    if V % a.shape[1]:  # columns past V: unspecified values; a target there (another shard's) is no hit
        a = jnp.where(cols < V, a, MASKED)
        hit = hit & (cols < V)
    acc_ref[...] += jnp.sum(jnp.where(hit, a, 0.0), axis=1, keepdims=True)
    m, l, s = online_update(m_ref[...], l_ref[...], s_ref[...], a, with_entropy)
    m_ref[...], l_ref[...] = m, l
    if with_entropy:
        s_ref[...] = s

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse, ent = finalize_stats(m_ref[...], l_ref[...], s_ref[...])
        lse_ref[...] = lse
        tgt_ref[...] = acc_ref[...]
        if with_entropy:
            ent_ref[...] = ent


def _dh_kernel(*refs, V, N, temperature, softcap, with_entropy, precision):
    *row_refs, h_ref, w_ref, dh_ref, acc_ref = refs
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    w = w_ref[...]
    dz = _dlogits(row_refs, h_ref[...], w, j, V=V, temperature=temperature, softcap=softcap,
                  with_entropy=with_entropy, precision=precision).astype(w.dtype)

    def accumulate(w):
        acc_ref[...] += jax.lax.dot_general(dz, w, _NT, preferred_element_type=jnp.float32, precision=precision)

    if V % w.shape[1]:  # the edge tile of w holds unspecified values past V: 0 * nan would be nan
        last = j == pl.num_programs(1) - 1
        pl.when(last)(lambda: accumulate(jnp.where(_cols(j, (1, w.shape[1])) < V, w, 0)))
        pl.when(jnp.logical_not(last))(lambda: accumulate(w))
    else:
        accumulate(w)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dw_kernel(*refs, V, N, temperature, softcap, with_entropy, precision):
    *row_refs, h_ref, w_ref, dw_ref, acc_ref = refs
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    h = h_ref[...]
    dz = _dlogits(row_refs, h, w_ref[...], j, V=V, temperature=temperature, softcap=softcap,
                  with_entropy=with_entropy, precision=precision)

    def accumulate(h, dz):
        acc_ref[...] += jax.lax.dot_general(h, dz.astype(h.dtype), _TN, preferred_element_type=jnp.float32,
                                            precision=precision)

    if N % h.shape[0]:  # rows past N hold unspecified values and are summed over here
        last = i == pl.num_programs(1) - 1
        valid = i * h.shape[0] + jax.lax.broadcasted_iota(jnp.int32, (h.shape[0], 1), 0) < N
        pl.when(last)(lambda: accumulate(jnp.where(valid, h, 0), jnp.where(valid, dz, 0.0)))
        pl.when(jnp.logical_not(last))(lambda: accumulate(h, dz))
    else:
        accumulate(h, dz)

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _dlogits(row_refs, h, w, j, *, V, temperature, softcap, with_entropy, precision):
    """dz for the [block_n, block_v] tile at vocab block j; zero in columns past V."""
    if with_entropy:
        t_ref, lse_ref, g_lp_ref, ent_ref, g_ent_ref = row_refs
        ent, g_ent = ent_ref[...], g_ent_ref[...]
    else:
        t_ref, lse_ref, g_lp_ref = row_refs
        ent = g_ent = None
    z = jnp.dot(h, w, preferred_element_type=jnp.float32, precision=precision)
    a = scale_logits(z, temperature, softcap)
    cols = _cols(j, a.shape)
    dz = logits_grad(a, cols == t_ref[...], lse_ref[...], ent, g_lp_ref[...], g_ent,
                     temperature=temperature, softcap=softcap)
    if V % a.shape[1]:
        dz = jnp.where(cols < V, dz, 0.0)
    return dz


# ----------------------------------------------------------------------------- helpers


def _cols(j, shape):
    return j * shape[1] + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _block(block, size, multiple, name):
    """A block no larger than the array (a block equal to the full dimension is always legal); a
    smaller one must be a multiple of the (16, 128) tile of bf16 data."""
    if block >= size:
        return size
    if block % multiple:
        raise ValueError(f"token_logprobs (pallas_tpu): {name}={block} must be a multiple of {multiple} "
                         f"(or cover the whole dimension, {size})")
    return block


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _cost(N, D, V, dtype, *, matmuls, h_reads, w_reads):
    itemsize = jnp.dtype(dtype).itemsize
    return pl.CostEstimate(
        flops=2 * N * D * V * matmuls,
        transcendentals=N * V,
        bytes_accessed=itemsize * (N * D * h_reads + D * V * w_reads),
    )
