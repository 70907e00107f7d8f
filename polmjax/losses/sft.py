"""Supervised fine-tuning: negative log-likelihood of completion tokens.

    L = - sum_t w_t log p(y_t | y_<t)

with weights w that make the sum over the *global* batch a mean: over all completion tokens
(`"token"`, as TRL's default) or over documents, each document's tokens averaged first (`"sequence"`).
Weights are computed once on the whole global batch, so gradient accumulation over micro-batches and
packing several documents per row give exactly the loss of one big unpacked batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

REDUCTIONS = ("token", "sequence")


def token_weights(loss_mask_BT: jax.Array, segment_ids_BT: jax.Array, reduction: str = "token") -> jax.Array:
    """Per-token weights [B, T] (float32) whose sum over the batch is 1 (0 if nothing is trained)."""
    mask = loss_mask_BT.astype(jnp.float32)
    if reduction == "token":
        return mask / jnp.maximum(mask.sum(), 1.0)
    if reduction != "sequence":
        raise ValueError(f"sft reduction {reduction!r}; expected one of {REDUCTIONS}")
    B, T = mask.shape
    doc_BT = jnp.arange(B, dtype=jnp.int32)[:, None] * T + segment_ids_BT.astype(jnp.int32)
    counts = jax.ops.segment_sum(mask.reshape(-1), doc_BT.reshape(-1), num_segments=B * T)
    num_docs = jnp.maximum((counts > 0).sum(), 1).astype(jnp.float32)
    per_token_count = counts[doc_BT.reshape(-1)].reshape(B, T)
    return mask / jnp.maximum(per_token_count, 1.0) / num_docs


def sft_loss(logprobs_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """Per-row loss [B]: - sum_t w_t log p_t. With `token_weights`, the rows sum to the batch loss."""
    return -(logprobs_BT.astype(jnp.float32) * weights_BT).sum(axis=-1)
