"""Attention in plain jnp: the reference every kernel is tested against, and the CPU path.

GQA/MQA are computed by grouping query heads over their shared kv head (`[B, T, G, R, K]`), so K and V
are never repeated in memory. Logits and softmax are float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    T: int, S: int, *, causal: bool, q_offset, window: int | None, q_segment_BT=None, kv_segment_BS=None
) -> jax.Array:
    """Boolean [B or 1, T, S]: may query t see key s.

    Query t sits at key index `q_offset + t`. causal: s <= q_offset + t. window W: q_offset + t - s < W
    (a query sees W keys, itself included, as `transformers`' sliding windows). Segments: equal ids.
    """
    q_idx = (jnp.arange(T) + q_offset)[:, None]
    k_idx = jnp.arange(S)[None, :]
    mask = jnp.ones((T, S), dtype=bool)
    if causal:
        mask &= k_idx <= q_idx
    if window is not None:
        mask &= q_idx - k_idx < window
        if not causal:
            mask &= k_idx - q_idx < window
    mask = mask[None]
    if q_segment_BT is not None:
        mask = mask & (q_segment_BT[:, :, None] == kv_segment_BS[:, None, :])
    return mask


def attention_reference(
    q_BTHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGK: jax.Array,
    *,
    causal: bool = True,
    q_segment_BT: jax.Array | None = None,
    kv_segment_BS: jax.Array | None = None,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    q_offset=None,
) -> jax.Array:
    """softmax(mask(softcap(scale * q k^T))) v, per kv group. Returns [B, T, H, K] in q's dtype.

    A query that may see no key at all (possible only with segments or offsets) gets zeros.
    Laid out for XLA's batched matmuls, as the flash kernels compute: heads grouped as [B, G, R, T, K] so
    both products take the [.., T, S] logits in the layout they are made in (no transposed copies of
    them), and the softmax normalised after the second product, on [T, K] rather than [T, S]. On XLA:CPU
    this cuts a layer's forward + backward from 24 to 16 passes over [B, H, T, S] float32 arrays.
    """
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[1], k_BSGK.shape[2]
    R = H // G
    scale = K**-0.5 if scale is None else scale
    q_offset = S - T if q_offset is None else q_offset
    q_BGRTK = q_BTHK.reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4)
    k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
    logits_BGRTS = jnp.einsum(
        "bgrtk,bgsk->bgrts", q_BGRTK, k_BGSK, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    if softcap is not None:
        logits_BGRTS = jnp.tanh(logits_BGRTS / softcap) * softcap
    mask_BTS = attention_mask(T, S, causal=causal, q_offset=q_offset, window=window,
                              q_segment_BT=q_segment_BT, kv_segment_BS=kv_segment_BS)
    logits_BGRTS = jnp.where(mask_BTS[:, None, None], logits_BGRTS, _MASKED)
    m_BGRT1 = jax.lax.stop_gradient(logits_BGRTS.max(axis=-1, keepdims=True))
    e_BGRTS = jnp.exp(logits_BGRTS - m_BGRT1)  # a row that sees nothing: all 1 here, zeroed below
    l_BGRT1 = e_BGRTS.sum(axis=-1, keepdims=True)
    out_BGRTK = jnp.einsum(
        "bgrts,bgsk->bgrtk", e_BGRTS.astype(v_BSGK.dtype), v_BGSK, preferred_element_type=jnp.float32
    ) / l_BGRT1
    sees_B11T1 = mask_BTS.any(axis=-1)[:, None, None, :, None]
    out_BGRTK = jnp.where(sees_B11T1, out_BGRTK, 0.0)
    return out_BGRTK.transpose(0, 3, 1, 2, 4).reshape(B, T, H, K).astype(q_BTHK.dtype)
