"""Preference (DPO, reward model) and unpaired (KTO) data: packed, sharded, resumable batches.

    from polmjax.data import DataConfig, PreferencePipeline, pairs_per_row
    pipe = PreferencePipeline(DataConfig(path="pairs.jsonl"), tokenizer, global_batch=8, seq_len=1024)

Both pipelines are `PackedPipeline`s (pipeline.py): the same shuffle per epoch, per-process
sharding, packing (DataConfig.packing), eval split (DataConfig.eval_fraction), bad-row reporting
(file, 1-based row, field; skip_bad_rows counts) and exact resume (get_state / set_state); only
how a row becomes a document differs.

A pair is ONE document of two segments, packed into the same row: segment 2k+1 = prompt + chosen,
segment 2k+2 = prompt + rejected for the k-th pair of the row. The prompt is repeated, so each
sequence is an independent causal document (positions restart at 0, attention stays within its
segment), and a pair never straddles rows, micro-batches or devices. Batch (rows = global_batch //
process_count; every array [rows, seq_len]):

    input_ids    int32    tokens; pad id on padding
    targets      int32    next token within the same sequence; 0 at a sequence's last token, padding
    loss_mask    float32  1 where the target is a response token (chosen / rejected, incl. EOS or
                          the template's end of turn); 0 on prompt targets and padding
    positions    int32    0, 1, ... per sequence
    segment_ids  int32    2k+1 / 2k+2 for the chosen / rejected sequence of the row's k-th pair; 0 padding
    pair_ids     int32    (process_index * rows + row) * pairs_per_row + k: unique in the global
                          batch (a static slot id, not a dense count); -1 on padding
    is_chosen    bool     True on the tokens of chosen sequences
    margin       float32  only when the data has a `margin` column (or a margin_default is given):
                          the pair's margin on the tokens of both its sequences, 0 on padding.
                          TRL's RewardTrainer takes the column when present and then needs it on
                          every row; so does the pipeline (a row without it raises, naming it)

Static capacity: a kept sequence has >= 2 tokens (a response token is scored from the token
before it; a sequence without a scored token drops its pair), so a row holds at most
`pairs_per_row(seq_len)` = seq_len // 4 pairs and a global batch at most
max_pairs = global_batch * pairs_per_row slots. A step gets per-sequence log-prob sums
[B, pairs_per_row] with `polmjax.losses.segments.pair_sums(logp_BT, segment_ids, loss_mask, P)` (row
local, so exact under micro-batching and data sharding) and weights valid_BP / (number of valid
slots in the global batch); `pair_ids` serve `jax.ops.segment_sum(..., num_segments=max_pairs)` where a
global gather is wanted.

Length rule: each sequence (prompt + response) is at most seq_len // 2 tokens, so the two always
fit one row. A longer pair is cut by `tokenize_preference`'s rule (the prompt from the left, keeping
its BOS and its end next to the response; then the responses on the right) with
truncation="right" (the default), or dropped with truncation="drop"; "left" is refused.

Unpaired rows (prompt, completion, label) for KTO (`UnpairedPipeline`): the same keys without
pair_ids / is_chosen, plus `example_ids` (as pair_ids: a static slot id unique in the global batch, -1
on padding) and `desirable` (bool, True on the tokens of a label=True example's own sequence). Two
layouts:

- kl_pairs=True (KTO's loss): each example is ONE document of two segments, like a pair: segment
  2k+1 = prompt + its completion, segment 2k+2 = the same prompt + a mismatched completion (the KL
  baseline sequence, TRL's `KL_completion_*`), loss_mask on the completion tokens of both,
  `desirable` on the first only. `pair_sums(values, segment_ids, loss_mask, pairs_per_row(seq_len))`
  gives (example, KL) sums per slot; each sequence is at most seq_len // 2 tokens (the pair rule).
- kl_pairs=False (apo_zero_unpaired, no KL term): one segment per example, examples_per_row(seq_len)
  = seq_len // 2 slots a row (`sequence_sums` with num_segments = examples_per_row + 1); each example
  is at most seq_len tokens.

The mismatched completion follows TRL's KTOTrainer (`_prepare_dataset`: completions rotated by one
within each batch, (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})): the example at position p of its
epoch's (shuffled) stream takes the completion of position p - 1 within its chunk of `global_batch`
consecutive positions, cyclically; a chunk of one takes position p - 1 of the epoch (its own
completion only when the split has one example). It is a pure function of the stream index (the
partner record is read from `records.rows` by index), so it is deterministic and survives resume.
With packing="none" on one process a chunk is exactly a batch, as in TRL; with packing the partner
is a neighbour in the stream, in the same or a nearby batch (the estimate is a batch mean over
mismatched pairs either way).
"""

from __future__ import annotations

import threading
from typing import Any

import grain
import numpy as np

from polmjax.data.formats import DataError
from polmjax.data.packing import FIELDS, join_documents, make_document
from polmjax.data.pipeline import PackedPipeline
from polmjax.data.tokenize import fit_responses, tokenize_preference, tokenize_unpaired

MIN_SEQUENCE_TOKENS = 2  # a scored response token needs one token before it
_NO_LIMIT = 2**62  # max_len that never cuts: tokenise at full length first, to tell truncation apart


def pairs_per_row(seq_len: int) -> int:
    """Pair slots a row of seq_len tokens can hold (two sequences of >= 2 tokens each per pair)."""
    return seq_len // (2 * MIN_SEQUENCE_TOKENS)


def examples_per_row(seq_len: int) -> int:
    """Unpaired example slots a row of seq_len tokens can hold (one sequence of >= 2 tokens each)."""
    return seq_len // MIN_SEQUENCE_TOKENS


class PreferencePipeline(PackedPipeline):
    """Batches of packed preference pairs (format "preference"); schema in the module docstring."""

    FORMATS = ("preference",)
    KIND = "the preference"
    MIN_SEQ_LEN = 2 * MIN_SEQUENCE_TOKENS

    def __init__(self, cfg, tokenizer, *, margin_default: float | None = None, **kwargs):
        """margin_default: every pair's margin when the data has no `margin` column (a reward model
        passes 0.0, the margin-free loss, so its batches always hold `margin`); None: no `margin` key then."""
        _check_response_config(cfg, type(self).__name__)
        self.margin_default = margin_default
        super().__init__(cfg, tokenizer, **kwargs)

    @property
    def pairs_per_row(self) -> int:
        return pairs_per_row(self.seq_len)

    @property
    def max_pairs(self) -> int:
        """Pair slots in the global batch: the static size of per-pair arrays over the whole batch."""
        return self.global_batch * self.pairs_per_row

    def fingerprint(self) -> dict[str, Any]:
        return super().fingerprint() | {"margin": "column" if self.has_margin_column else self.margin_default}

    def _check_records(self):
        """Margins on every row or on none (TRL collates the column of all rows or of none): sets
        has_margin_column and adds the `margin` field when there are margins (or a default)."""
        rows = self.records.rows
        missing = [i for i, r in enumerate(rows) if "margin" not in r]
        self.has_margin_column = len(missing) < len(rows)
        if self.has_margin_column and missing:
            raise DataError(
                f"{self.records.where(missing[0])}: field 'margin' is missing, but {len(rows) - len(missing)} of "
                f"{len(rows)} rows have one ({len(missing)} do not); give every pair a margin (0 for none) or "
                "drop the column")
        if self.has_margin_column or self.margin_default is not None:
            self.FIELDS = (*self.FIELDS, "margin")

    def _document(self, row):
        max_len = self.seq_len // 2
        ids = tokenize_preference(row, self.tokenizer, max_len=_NO_LIMIT)
        truncated = len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) > max_len
        if truncated:
            if self.cfg.truncation == "drop":
                return None, False
            ids = tokenize_preference(row, self.tokenizer, max_len=max_len)
        doc = pair_document(ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"])
        if "margin" in self.FIELDS:
            doc["margin"] = np.full(len(doc["input_ids"]), row.get("margin", self.margin_default), np.float32)
        return doc, truncated

    def _finish(self, batch):
        seg = batch["segment_ids"]
        if seg.max(initial=0) > 2 * self.pairs_per_row:  # cannot happen: every sequence has >= 2 tokens
            raise AssertionError(f"a row holds more than pairs_per_row={self.pairs_per_row} pairs")
        batch["pair_ids"] = _slot_ids(seg, (seg - 1) // 2, self.pairs_per_row, self.process_index, self.rows)
        batch["is_chosen"] = seg % 2 == 1
        return batch


class UnpairedPipeline(PackedPipeline):
    """Batches of packed unpaired examples (format "unpaired", KTO); schema and the two layouts
    (kl_pairs: with KTO's mismatched KL-baseline sequence, or one segment per example) in the module
    docstring."""

    FORMATS = ("unpaired",)
    KIND = "the unpaired"
    FIELDS = (*FIELDS, "desirable")
    MIN_SEQ_LEN = MIN_SEQUENCE_TOKENS

    def __init__(self, cfg, tokenizer, *, kl_pairs: bool = False, **kwargs):
        _check_response_config(cfg, type(self).__name__)
        self.kl_pairs = kl_pairs
        if kl_pairs:
            self.MIN_SEQ_LEN = 2 * MIN_SEQUENCE_TOKENS
        self._stream, self._local = None, threading.local()
        super().__init__(cfg, tokenizer, **kwargs)

    @property
    def examples_per_row(self) -> int:
        """Example slots a row holds: pairs_per_row(seq_len) with KL sequences, else examples_per_row."""
        return pairs_per_row(self.seq_len) if self.kl_pairs else examples_per_row(self.seq_len)

    def fingerprint(self) -> dict[str, Any]:
        return super().fingerprint() | {"kl_pairs": self.kl_pairs}

    def kl_partner(self, index: int) -> int:
        """The record whose completion the example at stream `index` is paired with for the KL baseline."""
        n = len(self.indices)
        epoch, p = divmod(index, n)
        start = p - p % self.global_batch
        size = min(self.global_batch, n - start)
        q = start + (p - start - 1) % size if size > 1 else (p - 1) % n
        return int(self.indices[self._position(epoch * n + q)])

    def _position(self, index: int) -> int:
        """Position in self.indices of stream index `index` (the order `dataset()` reads)."""
        if self.split != "train":
            return index % len(self.indices)
        if self._stream is None:  # the same chain as PackedPipeline.dataset(): grain's index shuffle per epoch
            self._stream = grain.MapDataset.range(len(self.indices)).shuffle(seed=self.cfg.seed).repeat(
                self.cfg.num_epochs)
        return int(self._stream[index])

    def _prepare(self, item):
        # _document needs the stream index to find the KL partner; grain maps on several threads, so the
        # index travels per thread (the base _prepare calls _document on the thread it runs on)
        self._local.index = item[1]
        return super()._prepare(item)

    def _document(self, row):
        if self.kl_pairs:
            return self._kl_document(row)
        ids = tokenize_unpaired(row, self.tokenizer, max_len=_NO_LIMIT)
        truncated = len(ids["prompt_ids"]) + len(ids["completion_ids"]) > self.seq_len
        if truncated:
            if self.cfg.truncation == "drop":
                return None, False
            ids = tokenize_unpaired(row, self.tokenizer, max_len=self.seq_len)
        doc = _sequence(ids["prompt_ids"], ids["completion_ids"])
        return doc | {"desirable": np.full(len(doc["input_ids"]), ids["label"], bool)}, truncated

    def _kl_document(self, row):
        ids = tokenize_unpaired(row, self.tokenizer, max_len=_NO_LIMIT)
        partner = self.kl_partner(self._local.index)
        try:
            other = tokenize_unpaired(self.records.rows[partner], self.tokenizer, max_len=_NO_LIMIT)["completion_ids"]
        except Exception as e:
            raise DataError(f"its KL-baseline completion from {self.records.where(partner)}: {e}") from e
        prompt, responses = ids["prompt_ids"], [ids["completion_ids"], other]
        max_len = self.seq_len // 2
        truncated = len(prompt) + max(len(r) for r in responses) > max_len
        if truncated:
            if self.cfg.truncation == "drop":
                return None, False
            prompt, responses = fit_responses(self.tokenizer, prompt, responses, max_len)
        doc = pair_document(prompt, *responses)
        return doc | {"desirable": (doc["segment_ids"] == 1) & bool(ids["label"])}, truncated

    def _finish(self, batch):
        seg = batch["segment_ids"]
        slot = (seg - 1) // 2 if self.kl_pairs else seg - 1
        batch["example_ids"] = _slot_ids(seg, slot, self.examples_per_row, self.process_index, self.rows)
        return batch


def pair_document(prompt_ids: np.ndarray, chosen_ids: np.ndarray, rejected_ids: np.ndarray) -> dict[str, np.ndarray]:
    """One packing document of two segments, prompt + chosen and prompt + rejected, each with
    next-token targets and loss on its response tokens only."""
    return join_documents([_sequence(prompt_ids, chosen_ids), _sequence(prompt_ids, rejected_ids)])


def _sequence(prompt_ids: np.ndarray, response_ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = np.concatenate([prompt_ids, response_ids]).astype(np.int32)
    return make_document(ids, np.arange(len(ids)) >= len(prompt_ids))


def _slot_ids(segment_ids_RT, slot_RT, slots_per_row: int, process_index: int, rows: int) -> np.ndarray:
    """(global row) * slots_per_row + slot on tokens, -1 on padding."""
    row_R1 = process_index * rows + np.arange(rows, dtype=np.int64)[:, None]
    return np.where(segment_ids_RT > 0, row_R1 * slots_per_row + slot_RT, -1).astype(np.int32)


def _check_response_config(cfg: Any, name: str) -> None:
    if cfg.truncation == "left":
        raise DataError(
            f"DataConfig.truncation='left' does not apply to {name}: the prompt is always cut from the left "
            "and the responses from the right (truncation='right', the default), or over-long examples are "
            "dropped (truncation='drop')"
        )
    if not cfg.completion_only_loss:
        raise DataError(
            f"DataConfig.completion_only_loss=False does not apply to {name}: preference and KTO losses "
            "score the responses only"
        )
