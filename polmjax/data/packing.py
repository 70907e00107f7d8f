"""Packing documents into fixed-length rows: bin assignment and row assembly (pure numpy).

A document is a dict of equal-length 1-D arrays `input_ids`, `targets`, `loss_mask` whose targets
and mask were computed on the document alone (`make_document`), so a packed row never lets one
document predict the next one's first token. Rows carry `positions` (restarting at 0 for every
segment) and `segment_ids` (1, 2, ... per segment, 0 for padding) for the attention mask.

A document is one segment (an SFT example), or several independent causal sequences that must
stay in the same row (`join_documents`: a preference pair is prompt+chosen, prompt+rejected). The
packer moves documents, never segments, so the sequences of one document never straddle rows.

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
    "desirable": np.bool_,  # unpaired (KTO) label of the segment's example
    "margin": np.float32,  # a preference pair's margin (the data's `margin` column), on both its sequences
    "record_ids": np.int32,  # the source record of each token (precomputing reference log-probs)
    "ref_logps": np.float32,  # precomputed reference log-prob of each target (polmjax.train.reference)
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


def join_documents(docs: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One document of several segments: fields concatenated, `positions` restarting at 0 and
    local `segment_ids` 1, 2, ... per part (offset by the row's earlier segments when assembled)."""
    out = {k: np.concatenate([d[k] for d in docs]) for k in docs[0]}
    out["positions"] = np.concatenate([np.arange(len(d["input_ids"]), dtype=np.int32) for d in docs])
    out["segment_ids"] = np.concatenate(
        [np.full(len(d["input_ids"]), s, np.int32) for s, d in enumerate(docs, start=1)])
    return out


def segments_have_loss(doc: dict[str, np.ndarray]) -> bool:
    """True if every segment of the document has at least one loss token."""
    segments = doc.get("segment_ids")
    if segments is None:
        return bool(doc["loss_mask"].any())
    return bool((np.bincount(segments, weights=doc["loss_mask"])[1:] > 0).all())


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
    docs: Sequence[dict[str, np.ndarray]],
    bins: Sequence[Sequence[int]],
    seq_len: int,
    pad_id: int,
    fields: Sequence[str] = FIELDS,
) -> dict[str, np.ndarray]:
    """Lays the documents of each bin side by side: dict of [len(bins), seq_len] arrays.

    `positions` and `segment_ids` come from the documents' own (`join_documents`) or, for a
    one-segment document, are 0.. and the next segment id; the other `fields` are copied.
    """
    out = empty_rows(len(bins), seq_len, pad_id, fields)
    copied = [k for k in fields if k not in ("positions", "segment_ids")]
    for r, members in enumerate(bins):
        start = segments = 0
        for i in members:
            doc = docs[i]
            end = start + len(doc["input_ids"])
            for k in copied:
                out[k][r, start:end] = doc[k]
            local = doc.get("segment_ids")
            out["positions"][r, start:end] = doc["positions"] if local is not None else np.arange(end - start)
            out["segment_ids"][r, start:end] = segments + (1 if local is None else local)
            segments += 1 if local is None else int(local.max())
            start = end
    return out


def empty_rows(n: int, seq_len: int, pad_id: int, fields: Sequence[str] = FIELDS) -> dict[str, np.ndarray]:
    """Padding rows: pad ids, no targets, no loss, segment 0 (and 0/False in any other field)."""
    out = {k: np.zeros((n, seq_len), DTYPES[k]) for k in fields}
    out["input_ids"][:] = pad_id
    return out
