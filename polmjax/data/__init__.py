"""Datasets in TRL's formats -> tokenised, packed, sharded, resumable batches.

    from polmjax.data import DataConfig, SFTPipeline
    pipe = SFTPipeline(DataConfig(path="train.jsonl"), tokenizer, global_batch=8, seq_len=128,
                       process_index=jax.process_index(), process_count=jax.process_count())
    it = iter(pipe); batch = next(it); state = it.get_state(); it.set_state(state)

formats.py validates rows, sources.py loads them with provenance, tokenize.py applies chat
templates and assistant masks, packing.py packs documents into rows, pipeline.py runs it on grain
(`PackedPipeline`, `SFTPipeline`), preference.py adds preference pairs and unpaired (KTO) examples.
"""

from polmjax.data.formats import FORMATS, DataError, detect_format, validate_row
from polmjax.data.packing import (
    PACKINGS,
    assemble_rows,
    assign_bins,
    join_documents,
    make_document,
)
from polmjax.data.pipeline import DataConfig, PackedPipeline, SFTPipeline, split_indices
from polmjax.data.preference import (
    PreferencePipeline,
    UnpairedPipeline,
    examples_per_row,
    pair_document,
    pairs_per_row,
)
from polmjax.data.sources import Records, load_records
from polmjax.data.tokenize import (
    stop_token_ids,
    tokenize_example,
    tokenize_preference,
    tokenize_unpaired,
)

__all__ = [
    "FORMATS",
    "PACKINGS",
    "DataConfig",
    "DataError",
    "PackedPipeline",
    "PreferencePipeline",
    "Records",
    "SFTPipeline",
    "UnpairedPipeline",
    "assemble_rows",
    "assign_bins",
    "detect_format",
    "examples_per_row",
    "join_documents",
    "load_records",
    "make_document",
    "pair_document",
    "pairs_per_row",
    "split_indices",
    "stop_token_ids",
    "tokenize_example",
    "tokenize_preference",
    "tokenize_unpaired",
    "validate_row",
]
