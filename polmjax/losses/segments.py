"""Per-sequence sums of per-token values in packed rows: how a preference step gets its log-probs.

A packed row holds several independent sequences, told apart by `segment_ids` (1, 2, ...; 0 is
padding). The DPO family, reward models and KTO score whole sequences, so a step turns per-token
log-probs [B, T] into per-sequence sums with one scatter-add per row:

    logp_BT = target_logprobs(...)                                       # [B, T]: policy, reference
    chosen_BP, rejected_BP = pair_sums(logp_BT, batch["segment_ids"], batch["loss_mask"], P)
    n_chosen_BP, n_rejected_BP = pair_sums(ones_BT, segment_ids, loss_mask, P)  # tokens (IPO, SimPO)
    valid_BP = n_chosen_BP > 0                                           # slot holds a pair
    weights_BP = valid_BP / valid_BP.sum()                               # on the *global* batch

with P = `polmjax.data.pairs_per_row(seq_len)`: the preference pipeline puts pair k of a row in
segments 2k+1 (prompt + chosen) and 2k+2 (prompt + rejected), so the sums stay per row (local to
the row's device, and exact when rows are split into micro-batches). Everything is static-shaped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_sums(values_BT: jax.Array, segment_ids_BT: jax.Array, mask_BT: jax.Array,
                  num_segments: int) -> jax.Array:
    """sums_BS[b, s] = sum of values * mask over the tokens of segment s in row b; float32 [B, num_segments].

    Column 0 collects padding (zero where the mask is 0 there). Segment ids >= num_segments are
    dropped (jax.ops.segment_sum semantics), so size num_segments to the largest id + 1.
    """
    B, _ = values_BT.shape
    weighted_BT = values_BT.astype(jnp.float32) * mask_BT.astype(jnp.float32)
    ids_BT = segment_ids_BT.astype(jnp.int32) + num_segments * jnp.arange(B, dtype=jnp.int32)[:, None]
    ids_BT = jnp.where(segment_ids_BT < num_segments, ids_BT, B * num_segments)  # out of range: dropped
    sums = jax.ops.segment_sum(weighted_BT.reshape(-1), ids_BT.reshape(-1), num_segments=B * num_segments)
    return sums.reshape(B, num_segments)


def pair_sums(values_BT: jax.Array, segment_ids_BT: jax.Array, mask_BT: jax.Array,
              pairs_per_row: int) -> tuple[jax.Array, jax.Array]:
    """(chosen_BP, rejected_BP): per-pair sums of values * mask, float32 [B, pairs_per_row] each.

    Pair slot k of row b is segments 2k+1 (chosen) and 2k+2 (rejected); empty slots sum to 0.
    """
    sums_BS = sequence_sums(values_BT, segment_ids_BT, mask_BT, 2 * pairs_per_row + 1)
    return sums_BS[:, 1::2], sums_BS[:, 2::2]
