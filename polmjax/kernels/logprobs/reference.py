"""Target-token log-probs in plain jnp: the reference every kernel is tested against, and the CPU path.

For hidden states h_ND, an unembedding w_DV and target ids t_N:

    z_NV = h_ND @ w_DV                            float32 accumulation
    a_NV = softcap * tanh(z_NV / softcap) / temperature    (soft-cap optional: Gemma 2/3 final logits)
    lse_N = log sum_v exp(a_nv),   p_NV = exp(a_NV - lse_N)
    lp_N = a[n, t_n] - lse_N
    entropy_N = -sum_v p_nv log p_nv = lse_N - sum_v p_nv a_nv

Backward, for cotangents g_lp_N and g_ent_N (d entropy / d a_v = p_v (lse - a_v - entropy)):

    da_NV = g_lp (onehot(t) - p) + g_ent p (lse - a - entropy)
    dz_NV = da_NV / temperature * (1 - tanh^2(z / softcap))
    dh_ND = dz_NV @ w_DV^T,   dw_DV = h_ND^T @ dz_NV     (dz cast to the input dtype, float32 accumulation)

`token_logprobs_naive` materialises [N, V] (tests and benchmarks only). `token_logprobs_reference`
walks the vocabulary in chunks of `chunk_v` columns with an online logsumexp, so it holds
O(N * chunk_v) floats, never O(N * V); its custom_vjp backward recomputes each chunk of logits from the
saved per-token lse (and entropy). The element-wise pieces (`scale_logits`, `online_update`,
`logits_grad`) are shared with the Pallas kernels, so the math is written once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Finite "minus infinity" for masked vocabulary columns: exp() of it is 0 and 0 * (it - m) stays 0,
# where -inf would give nan in the entropy accumulator.
MASKED = -1e30

DEFAULT_CHUNK_V = 1024

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def token_logprobs_naive(
    hidden_ND: jax.Array,
    unembed_DV: jax.Array,
    targets_N: jax.Array,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
):
    """log_softmax(h @ w)[target] with the full [N, V] float32 logits in memory; autodiff gradients."""
    z_NV = jnp.dot(hidden_ND, unembed_DV, preferred_element_type=jnp.float32)
    logp_NV = jax.nn.log_softmax(scale_logits(z_NV, temperature, softcap), axis=-1)
    lp_N = jnp.take_along_axis(logp_NV, targets_N.astype(jnp.int32).reshape(-1, 1), axis=-1)[:, 0]
    if not return_entropy:
        return lp_N
    return lp_N, -jnp.sum(jnp.exp(logp_NV) * logp_NV, axis=-1)


def token_logprobs_reference(
    hidden_ND: jax.Array,
    unembed_DV: jax.Array,
    targets_N: jax.Array,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    chunk_v: int = DEFAULT_CHUNK_V,
):
    """Chunked over the vocabulary, O(N * chunk_v) temporaries, forward and backward (custom_vjp).

    Returns lp_N (float32), or (lp_N, entropy_N) with return_entropy. Arguments are checked by
    `polmjax.kernels.token_logprobs`, which dispatches here for impl="xla".
    """
    return _reference(hidden_ND, unembed_DV, targets_N.astype(jnp.int32),
                      float(temperature), softcap, bool(return_entropy), int(chunk_v))


# ----------------------------------------------------------------------------- custom_vjp wiring


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _reference(h_ND, w_DV, t_N, temperature, softcap, with_entropy, chunk_v):
    out, _ = _reference_fwd(h_ND, w_DV, t_N, temperature, softcap, with_entropy, chunk_v)
    return out


def _reference_fwd(h_ND, w_DV, t_N, temperature, softcap, with_entropy, chunk_v):
    lse_N, tgt_N, ent_N = forward_stats(
        h_ND, w_DV, t_N, temperature=temperature, softcap=softcap, with_entropy=with_entropy,
        chunk_v=chunk_v,
    )
    lp_N = tgt_N - lse_N
    out = (lp_N, ent_N) if with_entropy else lp_N
    return out, (h_ND, w_DV, t_N, lse_N, ent_N)


def _reference_bwd(temperature, softcap, with_entropy, chunk_v, res, g):
    h_ND, w_DV, t_N, lse_N, ent_N = res
    g_lp_N, g_ent_N = g if with_entropy else (g, None)
    dh_ND, dw_DV = backward(
        h_ND, w_DV, t_N, lse_N, ent_N, g_lp_N, g_ent_N,
        temperature=temperature, softcap=softcap, chunk_v=chunk_v,
    )
    return dh_ND, dw_DV, None


_reference.defvjp(_reference_fwd, _reference_bwd)


# ----------------------------------------------------------------------------- chunked passes


def forward_stats(h_ND, w_DV, t_N, *, temperature, softcap, with_entropy, chunk_v=DEFAULT_CHUNK_V):
    """Per-token (lse_N, target logit tgt_N, entropy_N or None), all float32, one vocab chunk at a time.

    Targets outside [0, V) match no column: their tgt is 0. The vocab-sharded path relies on this
    (each shard sees the targets of the other shards as out of range).
    """
    N, V = h_ND.shape[0], w_DV.shape[1]
    c, n_chunks = _chunking(V, chunk_v)
    t_N1 = t_N.reshape(N, 1)

    def body(k, carry):
        m_N1, l_N1, s_N1, tgt_N1 = carry
        w_Dc, cols_1c, valid_1c = _chunk(w_DV, k, c)
        a_Nc = scale_logits(jnp.dot(h_ND, w_Dc, preferred_element_type=jnp.float32), temperature, softcap)
        a_Nc = jnp.where(valid_1c, a_Nc, MASKED)
        hit_Nc = (cols_1c == t_N1) & valid_1c
        tgt_N1 = tgt_N1 + jnp.sum(jnp.where(hit_Nc, a_Nc, 0.0), axis=1, keepdims=True)
        m_N1, l_N1, s_N1 = online_update(m_N1, l_N1, s_N1, a_Nc, with_entropy)
        return m_N1, l_N1, s_N1, tgt_N1

    init = (jnp.full((N, 1), MASKED, jnp.float32),) + (jnp.zeros((N, 1), jnp.float32),) * 3
    m_N1, l_N1, s_N1, tgt_N1 = jax.lax.fori_loop(0, n_chunks, body, init)
    lse_N, ent_N = finalize_stats(m_N1, l_N1, s_N1)
    return lse_N[:, 0], tgt_N1[:, 0], (ent_N[:, 0] if with_entropy else None)


def backward(h_ND, w_DV, t_N, lse_N, ent_N, g_lp_N, g_ent_N, *, temperature, softcap,
             chunk_v=DEFAULT_CHUNK_V):
    """(dh_ND, dw_DV) in the input dtypes; the logits of each vocab chunk are recomputed.

    g_ent_N=None (entropy not an output) drops the entropy term. dh accumulates in float32 over the
    chunks; each chunk of dw is finished in one step (all tokens at once) and written in place.
    """
    N, D = h_ND.shape
    V = w_DV.shape[1]
    c, n_chunks = _chunking(V, chunk_v)
    col = lambda x: None if x is None else x.astype(jnp.float32).reshape(N, 1)  # noqa: E731
    t_N1, lse_N1, ent_N1, g_lp_N1, g_ent_N1 = (
        t_N.reshape(N, 1), col(lse_N), col(ent_N), col(g_lp_N), col(g_ent_N))

    def body(k, carry):
        dh_ND, dw_DV = carry
        w_Dc, cols_1c, valid_1c = _chunk(w_DV, k, c)
        a_Nc = scale_logits(jnp.dot(h_ND, w_Dc, preferred_element_type=jnp.float32), temperature, softcap)
        dz_Nc = logits_grad(a_Nc, cols_1c == t_N1, lse_N1, ent_N1, g_lp_N1, g_ent_N1,
                            temperature=temperature, softcap=softcap)
        # Matmul operands in the input dtype, as in the kernels: a float32 copy of w or h would be
        # hoisted out of the loop by XLA (an O(D * V) temporary).
        dz_Nc = jnp.where(valid_1c, dz_Nc, 0.0).astype(w_DV.dtype)
        dh_ND = dh_ND + jax.lax.dot_general(dz_Nc, w_Dc, _NT, preferred_element_type=jnp.float32)
        dw_Dc = jax.lax.dot_general(h_ND, dz_Nc, _TN, preferred_element_type=jnp.float32)
        # The last chunk may overlap the one before (its start is clamped to V - c): keep those columns.
        start = jnp.minimum(k * c, V - c)
        old_Dc = jax.lax.dynamic_slice_in_dim(dw_DV, start, c, axis=1)
        dw_Dc = jnp.where(valid_1c, _as_bits(dw_Dc.astype(w_DV.dtype)), old_Dc)
        return dh_ND, jax.lax.dynamic_update_slice_in_dim(dw_DV, dw_Dc, start, axis=1)

    init = (jnp.zeros((N, D), jnp.float32), _as_bits(jnp.zeros_like(w_DV)))
    dh_ND, dw_DV = jax.lax.fori_loop(0, n_chunks, body, init)
    return dh_ND.astype(h_ND.dtype), _from_bits(dw_DV, w_DV.dtype)


# ----------------------------------------------------------------------------- shared element-wise math


def scale_logits(z, temperature, softcap):
    """a = softcap * tanh(z / softcap) / temperature (float32)."""
    z = z.astype(jnp.float32)
    if softcap is not None:
        z = jnp.tanh(z * (1.0 / softcap)) * softcap
    if temperature != 1.0:
        z = z * (1.0 / temperature)
    return z


def online_update(m_R1, l_R1, s_R1, a_RC, with_entropy):
    """Fold a block of scaled logits a_RC into running (max m, sum exp(a - m), sum exp(a - m)(a - m)).

    Rows R are tokens, columns C a block of the vocabulary. Keeping the entropy accumulator s relative
    to the running max avoids the cancellation of lse - E[a] when the distribution is peaked:
    on a max change m -> m', s' = alpha (s + (m - m') l) with alpha = exp(m - m').
    """
    m_new = jnp.maximum(m_R1, jnp.max(a_RC, axis=1, keepdims=True))
    alpha = jnp.exp(m_R1 - m_new)
    e_RC = jnp.exp(a_RC - m_new)
    l_new = alpha * l_R1 + jnp.sum(e_RC, axis=1, keepdims=True)
    if with_entropy:
        s_new = alpha * (s_R1 + (m_R1 - m_new) * l_R1) + jnp.sum(e_RC * (a_RC - m_new), axis=1, keepdims=True)
    else:
        s_new = s_R1
    return m_new, l_new, s_new


def finalize_stats(m, l, s):
    """(lse, entropy) from the online accumulators: lse = m + log l, entropy = log l - s / l."""
    log_l = jnp.log(l)
    return m + log_l, log_l - s / l


def logits_grad(a_RC, onehot_RC, lse_R1, ent_R1, g_lp_R1, g_ent_R1, *, temperature, softcap):
    """dz for a block of scaled logits a (see the module docstring); ent/g_ent None: no entropy term.

    The soft-cap derivative 1 - tanh^2(z / softcap) is rebuilt from a: tanh = a * temperature / softcap.
    """
    p_RC = jnp.exp(a_RC - lse_R1)
    da_RC = jnp.where(onehot_RC, g_lp_R1, 0.0) - g_lp_R1 * p_RC
    if g_ent_R1 is not None:
        da_RC = da_RC + g_ent_R1 * p_RC * (lse_R1 - a_RC - ent_R1)
    if softcap is not None:
        th_RC = a_RC * (temperature / softcap)
        da_RC = da_RC * (1.0 - th_RC * th_RC)
    if temperature != 1.0:
        da_RC = da_RC * (1.0 / temperature)
    return da_RC


# ----------------------------------------------------------------------------- helpers


def _chunking(V, chunk_v):
    c = max(1, min(int(chunk_v), V))
    return c, -(-V // c)


def _chunk(w_DV, k, c):
    """Chunk k of c columns. The last one starts at V - c (no padding copy of w); the columns it shares
    with chunk k - 1 are marked invalid. Returns (w_Dc, global column ids [1, c], valid [1, c])."""
    V = w_DV.shape[1]
    start = jnp.minimum(k * c, V - c)
    w_Dc = _from_bits(jax.lax.dynamic_slice_in_dim(_as_bits(w_DV), start, c, axis=1), w_DV.dtype)
    cols_1c = start + jax.lax.broadcasted_iota(jnp.int32, (1, c), 1)
    return w_Dc, cols_1c, cols_1c >= k * c


# XLA:CPU upcasts a 16-bit float dynamic-slice / dynamic-update-slice inside a loop to float32 and
# hoists the conversion of the whole [D, V] operand out of it (a 2 * D * V-byte temporary). Slicing
# the same bits viewed as uint16 keeps the loop's temporaries O(N * chunk_v).
def _as_bits(x):
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _from_bits(x, dtype):
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x
