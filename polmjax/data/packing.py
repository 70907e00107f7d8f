"""Packing documents into fixed-length rows: bin assignment and row assembly (pure numpy).

A document is a dict of equal-length 1-D arrays `input_ids`, `targets`, `loss_mask` whose targets
and mask were computed on the document alone (`make_document`), so a packed row never lets one
document predict the next one's first token. Rows carry `positions` (restarting at 0 for every
document) and `segment_ids` (1, 2, ... per document, 0 for padding) for the attention mask.

    none        one document per row
    first_fit   documents in arrival order, each into the first row with room (else a new row)
    best_fit    best-fit decreasing: longest first, each into the row it fills most tightly
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PACKINGS = ("none", "first_fit", "best_fit")
FIELDS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
DTYPES = {
    "input_ids": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "positions": np.int32,
    "segment_ids": np.int32,
}


def make_document(ids: np.ndarray, train: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token targets within one document: targets[t] = ids[t+1], loss on train[t+1].

    The last position has no next token: target 0, mask 0.
    """
    ids = np.asarray(ids, np.int32)
    targets = np.zeros_like(ids)
    targets[:-1] = ids[1:]
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:-1] = np.asarray(train[1:], np.float32)
    return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask}


def assign_bins(lengths: Sequence[int], capacity: int, packing: str) -> list[list[int]]:
    """Groups document indices into rows of at most `capacity` tokens, per `packing`."""
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r} is not one of {', '.join(PACKINGS)}")
    if any(n > capacity for n in lengths):
        raise ValueError(f"a document is longer than the row ({max(lengths)} > {capacity}); truncate first")
    if packing == "none":
        return [[i] for i in range(len(lengths))]
    order = range(len(lengths))
    if packing == "best_fit":
        order = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep arrival order
    bins: list[list[int]] = []
    free = np.zeros(0, np.int64)
    for i in order:
        fits = np.flatnonzero(free >= lengths[i])
        if fits.size == 0:
            bins.append([i])
            free = np.append(free, capacity - lengths[i])
            continue
        b = fits[0] if packing == "first_fit" else fits[np.argmin(free[fits])]
        bins[b].append(i)
        free[b] -= lengths[i]
    return bins


def assemble_rows(
    docs: Sequence[dict[str, np.ndarray]], bins: Sequence[Sequence[int]], seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Lays the documents of each bin side by side: dict of [len(bins), seq_len] arrays."""
    out = empty_rows(len(bins), seq_len, pad_id)
    for r, members in enumerate(bins):
        start = 0
        for segment, i in enumerate(members, start=1):
            doc = docs[i]
            end = start + len(doc["input_ids"])
            for k in ("input_ids", "targets", "loss_mask"):
                out[k][r, start:end] = doc[k]
            out["positions"][r, start:end] = np.arange(end - start)
            out["segment_ids"][r, start:end] = segment
            start = end
    return out


def empty_rows(n: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Padding rows: pad ids, no targets, no loss, segment 0."""
    out = {k: np.zeros((n, seq_len), DTYPES[k]) for k in FIELDS}
    out["input_ids"][:] = pad_id
    return out
