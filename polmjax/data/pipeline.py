"""Input pipelines on grain: shuffle, shard per process, tokenise, pack, batch; exact resume.

    records --range/shuffle(seed)/repeat(num_epochs)--> (epoch, stream index, record)   grain.MapDataset
            --[process_index::process_count]-->          this process's examples
            --map(tokenise, truncate, next-token targets)--> documents                   (prefetched)
            --_BatchIterator: pack a buffer of documents into rows, emit [rows, seq_len] batches

`PackedPipeline` is that machinery; a kind of data says only how one validated row becomes a
document (`_document`) and which batch keys it derives from the packed rows (`_finish`):
`SFTPipeline` here (one segment per example), `PreferencePipeline` and `UnpairedPipeline` in
preference.py (a pair = one document of two segments; a KTO example = one segment).

Shuffling is grain's index shuffle, reseeded every epoch (deterministic in `seed`). Each process
reads the examples of the global stream whose index is = process_index (mod process_count), so
the processes' examples are disjoint and together form the global stream; without packing, the
batches of all processes at one step hold exactly the examples of the global batch.

Resume: the batch iterator's state is the grain state at the start of the oldest document
buffer that still has rows to emit, how many of its rows were emitted, and the counters at that
point. `set_state` re-reads that buffer, repacks it (packing is deterministic) and skips the
emitted rows, so the batches that follow equal those of an uninterrupted run, across epoch
boundaries too. The state is a small JSON-serialisable dict.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any

import grain
import numpy as np

from polmjax.data.formats import SFT_FORMATS, DataError
from polmjax.data.packing import (
    FIELDS,
    PACKINGS,
    assemble_rows,
    assign_bins,
    empty_rows,
    make_document,
    segments_have_loss,
)
from polmjax.data.sources import Records, load_records
from polmjax.data.tokenize import tokenize_example

log = logging.getLogger("polmjax.data")

TRUNCATIONS = ("right", "left", "drop")
STATE_VERSION = 1
_PROBE_EXAMPLES = 16  # examples tokenised at construction so systematic errors surface early
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=128)


@dataclasses.dataclass
class DataConfig:
    """Where the data is and how it becomes batches; every pipeline (SFT, preference, unpaired) reads it."""

    path: str
    split: str = "train"  # split of a hub dataset / DatasetDict directory
    format: str = "auto"  # auto | text | prompt_completion | messages | preference | unpaired
    eval_fraction: float = 0.0  # held out (deterministically by seed) as the "eval" split
    packing: str = "best_fit"  # none | first_fit | best_fit
    truncation: str = "right"  # right | left | drop: examples longer than seq_len
    completion_only_loss: bool = True  # loss on completion / assistant tokens only
    skip_bad_rows: bool = False  # False: first bad row raises DataError; True: skip and count
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever, reshuffled every epoch
    max_rows: int | None = None  # read at most this many rows of the source
    pack_buffer: int = 256  # documents packed together; larger = less padding, more read-ahead

    def __post_init__(self):
        _check_choice("packing", self.packing, PACKINGS)
        _check_choice("truncation", self.truncation, TRUNCATIONS)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DataError(f"DataConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.seed < 2**32:
            raise DataError(f"DataConfig.seed must be in [0, 2**32), got {self.seed}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataError(f"DataConfig.num_epochs must be None or >= 1, got {self.num_epochs}")
        if self.pack_buffer < 1:
            raise DataError(f"DataConfig.pack_buffer must be >= 1, got {self.pack_buffer}")


class PackedPipeline:
    """Batches of packed, tokenised documents for one process; `iter()` gives a resumable iterator.

    Each batch is a dict of numpy arrays of shape [global_batch // process_count, seq_len]. The
    "train" split is shuffled and repeated per `cfg.num_epochs`; the "eval" split
    (cfg.eval_fraction of the rows) is read once, in order. A final partial batch is filled with
    padding rows (no loss). A kind of data sets FORMATS, FIELDS (the per-token fields packed),
    MIN_SEQ_LEN, and overrides `_document` (and `_finish` for derived batch keys, `_check_records`
    for checks across rows).
    """

    FORMATS: tuple[str, ...] = ()
    KIND = "documents"  # for messages: "<source>: format 'x' is not <KIND> format"
    FIELDS: tuple[str, ...] = FIELDS
    MIN_SEQ_LEN = 2

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        *,
        global_batch: int,
        seq_len: int,
        split: str = "train",
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch % process_count:
            raise DataError(f"global_batch={global_batch} is not divisible by process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
        if seq_len < self.MIN_SEQ_LEN:
            raise DataError(f"seq_len must be >= {self.MIN_SEQ_LEN} for {type(self).__name__}, got {seq_len}")
        _check_choice("split", split, ("train", "eval"))
        if split == "eval" and cfg.eval_fraction == 0:
            raise DataError("split='eval' needs DataConfig.eval_fraction > 0")
        self.cfg, self.tokenizer = dataclasses.replace(cfg), tokenizer  # a copy: later edits do not leak in
        self.global_batch, self.seq_len, self.split = global_batch, seq_len, split
        self.process_index, self.process_count = process_index, process_count
        self.rows = global_batch // process_count
        self.records: Records = load_records(
            cfg.path, split=cfg.split, format=cfg.format,
            skip_bad_rows=cfg.skip_bad_rows, max_rows=cfg.max_rows,
        )
        if self.records.format not in self.FORMATS:
            raise DataError(
                f"{self.records.source}: format {self.records.format!r} is not {self.KIND} format "
                f"({', '.join(self.FORMATS)}); {self.records.format} data goes to "
                f"{PIPELINE_OF_FORMAT[self.records.format]}"
            )
        self._check_records()
        train, held_out = split_indices(len(self.records), cfg.eval_fraction, cfg.seed)
        self.indices = train if split == "train" else held_out
        if not len(self.indices):
            raise DataError(f"{self.records.source}: the {split!r} split is empty")
        self.pad_id = _pad_id(tokenizer)
        self._probe()
        shard = f"; process {process_index} reads every {process_count}th" if process_count > 1 else ""
        log.info("%s: %s split, %d examples%s; %s packing into %d x %d", self.records.source, split,
                 len(self.indices), shard, cfg.packing, self.rows, seq_len)
        self._last_iterator: _BatchIterator | None = None

    def __iter__(self) -> _BatchIterator:
        self._last_iterator = iter(self.dataset())
        return self._last_iterator

    def dataset(self) -> grain.IterDataset:
        """The grain dataset behind `iter(self)` (for composing further grain stages)."""
        n = len(self.indices)
        ds = grain.MapDataset.range(n)
        if self.split == "train":
            ds = ds.shuffle(seed=self.cfg.seed).repeat(self.cfg.num_epochs)
        ds = ds.map_with_index(lambda i, j: (i // n, i, int(self.indices[j])))
        ds = ds[self.process_index :: self.process_count]
        ds = ds.map(self._prepare).to_iter_dataset(_READ_OPTIONS)
        return _BatchDataset(ds, self)

    @property
    def stats(self) -> dict[str, Any]:
        """Rows read, bad rows skipped (first reasons), examples truncated/dropped, epoch, fill."""
        r = self.records
        out = {
            "source": r.source,
            "format": r.format,
            "rows_read": r.rows_read,
            "bad_rows": r.bad_rows,
            "bad_row_reasons": list(r.bad_reasons),
            "examples": len(self.indices),
        }
        it = self._last_iterator
        out.update(it.stats if it is not None else _iterator_stats(dict.fromkeys(_COUNTERS, 0)))
        return out

    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must match to be restored into this pipeline."""
        c = self.cfg
        return {
            "kind": type(self).__name__,
            "format": self.records.format, "examples": len(self.indices), "split": self.split,
            "seed": c.seed, "num_epochs": c.num_epochs, "eval_fraction": c.eval_fraction,
            "packing": c.packing, "pack_buffer": c.pack_buffer, "truncation": c.truncation,
            "completion_only_loss": c.completion_only_loss, "global_batch": self.global_batch,
            "seq_len": self.seq_len, "process_index": self.process_index,
            "process_count": self.process_count,
        }

    def total_batches(self) -> int | None:
        """Batches every process yields on a finite stream without packing (None otherwise).

        Processes must take the same number of steps; without packing every process pads its
        stream to ceil(examples / global_batch) batches. With packing the count depends on the
        documents' lengths and can differ by a batch between processes, so a multi-host loop
        should run a fixed number of steps on a repeating stream rather than exhaust one.
        """
        if self.cfg.packing != "none" or (self.split == "train" and self.cfg.num_epochs is None):
            return None
        epochs = self.cfg.num_epochs if self.split == "train" else 1
        return math.ceil(len(self.indices) * epochs / self.global_batch)

    def _check_records(self) -> None:
        """Checks across the loaded rows (each row alone was validated by `formats.validate_row`);
        raises DataError naming the file and row."""

    def _document(self, row: dict[str, Any]) -> tuple[dict[str, np.ndarray] | None, bool]:
        """A validated row -> (document of at most seq_len tokens, truncated?); (None, False) drops
        it as too long. Any exception is that row's tokenisation error."""
        raise NotImplementedError

    def _finish(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Packed [rows, seq_len] arrays of FIELDS -> the batch (adds keys derived from segments)."""
        return batch

    def _prepare(self, item: tuple[int, int, int]) -> dict[str, Any]:
        """(epoch, stream index, record) -> document, or the reason it is dropped."""
        epoch, index, record = item
        out = {"epoch": epoch, "index": index, "drop": None, "truncated": False, "doc": None}
        try:
            doc, truncated = self._document(self.records.rows[record])
        except Exception as e:  # a template error in one row is that row's problem
            message = f"{self.records.where(record)}: cannot tokenise ({type(e).__name__}: {e})"
            if not self.cfg.skip_bad_rows:
                raise DataError(message) from e
            return out | {"drop": "bad", "reason": message}
        if doc is None:
            return out | {"drop": "too_long"}
        if not segments_have_loss(doc):
            return out | {"drop": "no_loss", "truncated": truncated}
        return out | {"doc": doc, "truncated": truncated}

    def _probe(self) -> None:
        """Tokenises the first examples now, so a broken template fails at construction."""
        results = [self._prepare((0, i, int(r))) for i, r in enumerate(self.indices[:_PROBE_EXAMPLES])]
        if all(r["drop"] == "bad" for r in results):
            raise DataError(f"none of the first {len(results)} examples tokenises; first: {results[0]['reason']}")


class SFTPipeline(PackedPipeline):
    """Batches of packed SFT examples (text, prompt_completion, messages), one segment each.

    Batch: input_ids, targets, positions, segment_ids (int32) and loss_mask (float32), all
    [global_batch // process_count, seq_len]. Examples longer than seq_len are cut per
    `cfg.truncation` (right / left keeping the BOS) or dropped.
    """

    FORMATS = SFT_FORMATS
    KIND = "an SFT"

    def _document(self, row):
        ids, train = tokenize_example(row, self.records.format, self.tokenizer,
                                      completion_only_loss=self.cfg.completion_only_loss)
        if len(ids) <= self.seq_len:
            return make_document(ids, train), False
        if self.cfg.truncation == "drop":
            return None, False
        ids, train = _truncate(ids, train, self.seq_len, self.cfg.truncation, self.tokenizer)
        return make_document(ids, train), True


PIPELINE_OF_FORMAT = {**dict.fromkeys(SFT_FORMATS, "SFTPipeline"), "preference": "PreferencePipeline",
                      "unpaired": "UnpairedPipeline"}


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/eval split of record indices (each sorted); eval gets round(n * f), >= 1."""
    if eval_fraction <= 0:
        return np.arange(n), np.arange(0)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


class _BatchDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, pipe: PackedPipeline):
        super().__init__(parent)
        self._pipe = pipe

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._parent.__iter__(), self._pipe)


@dataclasses.dataclass
class _Buffer:
    """Documents read together and packed into rows; rows[:emitted] were already emitted."""

    parent_state: dict[str, Any]  # grain state before the first document was read
    counters: dict[str, int]  # counters before the first document was read
    docs: list[dict[str, Any]]
    bins: list[list[int]]
    emitted: int = 0


_COUNTERS = (
    "examples_read", "examples_truncated", "dropped_too_long", "dropped_no_loss", "dropped_bad",
    "tokens", "loss_tokens", "slots",
)


class _BatchIterator(grain.DatasetIterator):
    """Packs buffers of documents into rows and emits batches; checkpointable (module docstring)."""

    def __init__(self, parent: grain.DatasetIterator, pipe: PackedPipeline):
        super().__init__(parent)
        self._pipe = pipe
        self._buffer_docs = pipe.rows if pipe.cfg.packing == "none" else pipe.cfg.pack_buffer
        self._local_examples = len(range(pipe.process_index, len(pipe.indices), pipe.process_count))
        self._total_batches = pipe.total_batches()
        self._pending: collections.deque[_Buffer] = collections.deque()
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._epoch = self._batches = self._drop_run = 0
        self._exhausted = False
        self._bad_reasons: list[str] = []

    def __next__(self) -> dict[str, np.ndarray]:
        p = self._pipe
        while self._pending_rows() < p.rows and not self._exhausted:
            self._read_buffer()
        parts, taken = [], 0
        while taken < p.rows and self._pending:
            buf = self._pending[0]
            k = min(p.rows - taken, len(buf.bins) - buf.emitted)
            bins = buf.bins[buf.emitted : buf.emitted + k]
            parts.append(assemble_rows(buf.docs, bins, p.seq_len, p.pad_id, p.FIELDS))
            self._epoch = max([self._epoch] + [buf.docs[i]["epoch"] for b in bins for i in b])
            buf.emitted += k
            taken += k
            if buf.emitted == len(buf.bins):
                self._pending.popleft()
        if not taken and (self._total_batches is None or self._batches >= self._total_batches):
            raise StopIteration
        parts.append(empty_rows(p.rows - taken, p.seq_len, p.pad_id, p.FIELDS))
        batch = p._finish({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
        self._batches += 1
        self._counters["tokens"] += int((batch["segment_ids"] > 0).sum())
        self._counters["loss_tokens"] += int(batch["loss_mask"].sum())
        self._counters["slots"] += batch["segment_ids"].size
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: epoch, batches emitted, grain state, counters."""
        if self._pending:
            buf = self._pending[0]
            position = {"parent": buf.parent_state, "counters": buf.counters, "skip_rows": buf.emitted}
        else:
            position = {"parent": self._parent.get_state(), "counters": dict(self._counters), "skip_rows": 0}
        # Batch counters belong to emitted batches, not to the re-read buffer.
        position["counters"] = position["counters"] | {
            k: self._counters[k] for k in ("tokens", "loss_tokens", "slots")
        }
        return {
            "version": STATE_VERSION,
            "config": self._pipe.fingerprint(),
            "epoch": self._epoch,
            "batches": self._batches,
            "position": position,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Resumes exactly where `get_state` was taken (the state must come from the same config)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self._pipe.fingerprint()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"cannot resume the data pipeline: the configuration changed ({details})")
        position = state["position"]
        self._parent.set_state(position["parent"])
        self._pending.clear()
        self._exhausted = False
        self._counters = dict(position["counters"])
        self._epoch, self._batches, self._drop_run = state["epoch"], state["batches"], 0
        if position["skip_rows"]:
            self._read_buffer()
            self._pending[0].emitted = position["skip_rows"]

    @property
    def stats(self) -> dict[str, Any]:
        return _iterator_stats(self._counters, self._epoch, self._batches, self._bad_reasons)

    def _count_drop(self, item: dict[str, Any]) -> None:
        self._counters[f"dropped_{item['drop']}"] += 1
        if item["drop"] == "bad" and len(self._bad_reasons) < 5:
            self._bad_reasons.append(item["reason"])
        self._drop_run += 1
        if self._drop_run >= max(1, self._local_examples):
            raise DataError(
                f"{self._pipe.records.source}: {self._drop_run} examples in a row were dropped "
                f"({self.stats['dropped']}); raise seq_len, use truncation='right', or fix the rows"
            )

    def _pending_rows(self) -> int:
        return sum(len(b.bins) - b.emitted for b in self._pending)

    def _read_buffer(self) -> None:
        p, c = self._pipe, self._counters
        parent_state, counters = self._parent.get_state(), dict(c)
        docs = []
        while len(docs) < self._buffer_docs:
            try:
                item = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            c["examples_read"] += 1
            c["examples_truncated"] += item["truncated"]
            if item["drop"] is None:
                docs.append(item["doc"] | {"epoch": item["epoch"], "index": item["index"]})
                self._drop_run = 0
            else:
                self._count_drop(item)
            if (item["index"] + p.process_count) // len(p.indices) != item["epoch"]:
                break  # a buffer never spans two epochs: epoch e is emitted before epoch e + 1
        if not docs:
            return
        bins = assign_bins([len(d["input_ids"]) for d in docs], p.seq_len, p.cfg.packing)
        if p.cfg.packing != "none":  # best-fit sorts by length: shuffle the rows back
            order = np.random.default_rng([p.cfg.seed, docs[0]["index"]]).permutation(len(bins))
            bins = [bins[i] for i in order]
        self._pending.append(_Buffer(parent_state, counters, docs, bins))


def _iterator_stats(c: dict[str, int], epoch=0, batches=0, bad_reasons=()) -> dict[str, Any]:
    dropped = {"too_long": c["dropped_too_long"], "no_loss_tokens": c["dropped_no_loss"],
               "cannot_tokenise": c["dropped_bad"]}
    return {
        "epoch": epoch,
        "batches": batches,
        "examples_read": c["examples_read"],
        "examples_truncated": c["examples_truncated"],
        "examples_dropped": sum(dropped.values()),
        "dropped": dropped,
        "tokenise_errors": list(bad_reasons),
        "fill": c["tokens"] / c["slots"] if c["slots"] else 0.0,  # non-padding share of slots
        "loss_tokens": c["loss_tokens"],
    }


def _truncate(ids, train, seq_len, mode, tokenizer):
    if mode == "right":
        return ids[:seq_len], train[:seq_len]
    bos = getattr(tokenizer, "bos_token_id", None)
    head = 1 if bos is not None and ids[0] == bos else 0  # left: keep the BOS, cut after it
    keep = np.r_[0:head, len(ids) - (seq_len - head) : len(ids)]
    return ids[keep], train[keep]


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DataError(f"{name}={value!r} is not one of {', '.join(choices)}")
