"""Validation and backend dispatch for `attention`."""

from __future__ import annotations

import jax

from polmjax.kernels.attention.reference import attention_reference

# Backends available now. Pallas TPU/GPU and cuDNN backends arrive with the kernel issue.
IMPLS = ("auto", "xla")


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
        passes the cache position here.
      impl: "auto" or "xla".
    Returns:
      [B, T, H, K] in q's dtype.
    """
    q_seg, kv_seg = _check(q_BTHK, k_BSGK, v_BSGK, segment_ids, window, softcap)
    if impl not in IMPLS:
        raise ValueError(f"attention: impl={impl!r} is not available; choose one of {IMPLS}")
    return attention_reference(
        q_BTHK, k_BSGK, v_BSGK, causal=causal, q_segment_BT=q_seg, kv_segment_BS=kv_seg,
        window=window, softcap=softcap, scale=scale, q_offset=q_offset,
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
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1, got {window}")
    if softcap is not None and softcap <= 0:
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
