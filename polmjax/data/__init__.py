"""Datasets in TRL's formats -> tokenised, packed, sharded, resumable batches.

    from polmjax.data import DataConfig, SFTPipeline
    pipe = SFTPipeline(DataConfig(path="train.jsonl"), tokenizer, global_batch=8, seq_len=128,
                       process_index=jax.process_index(), process_count=jax.process_count())
    it = iter(pipe); batch = next(it); state = it.get_state(); it.set_state(state)

formats.py validates rows, sources.py loads them with provenance, tokenize.py applies chat
templates and assistant masks, packing.py packs documents into rows, pipeline.py runs it on grain.
"""

from polmjax.data.formats import FORMATS, DataError, detect_format, validate_row
from polmjax.data.packing import PACKINGS, assemble_rows, assign_bins, make_document
from polmjax.data.pipeline import DataConfig, SFTPipeline, split_indices
from polmjax.data.sources import Records, load_records
from polmjax.data.tokenize import stop_token_ids, tokenize_example, tokenize_preference, tokenize_unpaired

__all__ = [
    "FORMATS",
    "PACKINGS",
    "DataConfig",
    "DataError",
    "Records",
    "SFTPipeline",
    "assemble_rows",
    "assign_bins",
    "detect_format",
    "load_records",
    "make_document",
    "split_indices",
    "stop_token_ids",
    "tokenize_example",
    "tokenize_preference",
    "tokenize_unpaired",
    "validate_row",
]
