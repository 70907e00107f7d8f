"""Load rows from a file, a `save_to_disk` directory or the hub, validate them, keep provenance.

`load_records` reads every row once, validates it against the (detected) format and keeps the
normalised rows in memory with their row number in the source, so that any later error can still
name the file and row. Row numbers are 1-based and, in JSONL files, equal the line number (blank
lines count), so "row 17" is what an editor shows as line 17. Supported sources:

    *.jsonl / *.json / *.parquet / *.csv    a local file (CSV cells are read as strings; a
                                            'label' cell true/false/1/0 becomes a bool, a
                                            'margin' cell a number, an empty one missing)
    a directory                             written by `datasets.Dataset(Dict).save_to_disk`
    anything else                           a hub dataset name, via `datasets.load_dataset`
                                            (needs network access; HF_HUB_OFFLINE=1 forbids it)
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from polmjax.data.formats import (
    FORMATS,
    DataError,
    RowError,
    detect_format,
    expected_fields,
    validate_row,
)

log = logging.getLogger("polmjax.data")

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_REASONS = 5
_DETECT_ROWS = 100  # rows whose keys are pooled to detect the format of schemaless JSON


@dataclasses.dataclass
class Records:
    """Validated rows of one source, in source order.

    rows[i] is the normalised row whose 1-based row number in `source` is row_numbers[i] (JSONL: line number).
    """

    source: str
    format: str
    rows: list[dict[str, Any]]
    row_numbers: list[int]
    columns: list[str]
    rows_read: int
    bad_rows: int = 0
    bad_reasons: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """'file row N' of record i, for error messages."""
        return f"{self.source} row {self.row_numbers[i]}"


def load_records(
    path: str | os.PathLike,
    *,
    split: str = "train",
    format: str = "auto",
    skip_bad_rows: bool = False,
    max_rows: int | None = None,
) -> Records:
    """Reads and validates up to `max_rows` rows of `path`.

    With skip_bad_rows=False the first bad row raises DataError naming file, row and field;
    with True bad rows are skipped, counted and the first few reasons kept (and a warning logged).
    """
    if format != "auto" and format not in FORMATS:
        raise DataError(f"format={format!r} is not one of auto, {', '.join(FORMATS)}")
    source, columns, raw = _open(os.fspath(path), split)
    if max_rows is not None:
        raw = itertools.islice(raw, max_rows)
    if format == "auto":
        if columns is None:  # schemaless JSON: pool the keys of the first rows
            head = list(itertools.islice(raw, _DETECT_ROWS))
            if not head:
                raise DataError(f"{source}: the file is empty (no rows)")
            columns = sorted({k for _, r in head if isinstance(r, dict) for k in r})
            raw = itertools.chain(head, raw)
        format = detect_format(columns, source)
        log.info("%s: detected format %r from columns %s", source, format, list(columns))
    records = Records(source, format, [], [], list(columns or ()), rows_read=0)
    for row_number, row in raw:
        records.rows_read += 1
        try:
            if isinstance(row, RowError):
                raise row
            records.rows.append(validate_row(row, format))
            records.row_numbers.append(row_number)
        except RowError as e:
            message = f"{source} row {row_number}: {e} (format {format} expects {expected_fields(format)})"
            if not skip_bad_rows:
                raise DataError(message) from None
            records.bad_rows += 1
            if len(records.bad_reasons) < MAX_REASONS:
                records.bad_reasons.append(message)
    if records.bad_rows:
        log.warning(
            "%s: skipped %d bad rows of %d (first: %s)",
            source, records.bad_rows, records.rows_read, records.bad_reasons[0],
        )
    if not records.rows_read:
        raise DataError(f"{source}: the dataset is empty (no rows)")
    if not records.rows:
        raise DataError(
            f"{source}: no valid rows (read {records.rows_read}, bad {records.bad_rows}"
            + (f"; first problem: {records.bad_reasons[0]}" if records.bad_reasons else "")
            + ")"
        )
    return records


RawRows = Iterator[tuple[int, Any]]  # (1-based row number, row dict or RowError)


def _open(path: str, split: str) -> tuple[str, list[str] | None, RawRows]:
    """Returns (source name for messages, column names or None if schemaless, raw rows)."""
    if os.path.isdir(path):
        return _open_saved(path, split)
    if os.path.isfile(path):
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".jsonl":
            return path, None, _jsonl_rows(path)
        if suffix == ".json":
            return _open_json(path)
        if suffix == ".parquet":
            return _open_parquet(path)
        if suffix == ".csv":
            return _open_csv(path)
        raise DataError(
            f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(FILE_SUFFIXES)} "
            "or a directory written by datasets' save_to_disk"
        )
    if path.endswith(FILE_SUFFIXES) or path.startswith(("/", "./", "../", "~")):
        raise DataError(f"{path}: no such file or directory")
    return _open_hub(path, split)


def _jsonl_rows(path: str) -> RawRows:
    """(line number, row) for every non-blank line: the row number is the line number."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_number, RowError(None, f"not valid JSON: {e}")


def _open_json(path: str) -> tuple[str, list[str] | None, RawRows]:
    """A JSON list of row objects, or an object of equal-length columns."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); for one object per line use .jsonl") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: columns have different lengths {sorted(lengths)}")
        columns = list(data)
        rows = ({k: data[k][i] for k in columns} for i in range(lengths.pop()))
        return path, columns, enumerate(rows, start=1)
    if isinstance(data, list):
        return path, None, enumerate(data, start=1)
    raise DataError(
        f"{path}: expected a JSON list of row objects or an object of column lists, "
        f"got {type(data).__name__}"
    )


def _open_parquet(path: str) -> tuple[str, list[str], RawRows]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: cannot read Parquet ({e})") from None

    def rows() -> RawRows:
        row = 1
        for batch in file.iter_batches(batch_size=4096):
            for item in batch.to_pylist():
                yield row, item
                row += 1

    return path, list(file.schema_arrow.names), rows()


def _open_csv(path: str) -> tuple[str, list[str], RawRows]:
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"{path}: empty CSV file (expected a header row)")

    def rows() -> RawRows:
        with open(path, encoding="utf-8", newline="") as f:
            for row, item in enumerate(csv.DictReader(f), start=1):
                item.pop(None, None)  # cells beyond the header
                if isinstance(item.get("label"), str):
                    item["label"] = _CSV_BOOLS.get(item["label"].strip().lower(), item["label"])
                if isinstance(item.get("margin"), str):
                    item["margin"] = _csv_number(item["margin"])
                yield row, item

    return path, header, rows()


_CSV_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _csv_number(cell: str) -> float | str | None:
    """A numeric CSV cell as a float; an empty one as missing; anything else as it is (validation names it)."""
    try:
        return float(cell) if cell.strip() else None
    except ValueError:
        return cell


def _open_saved(path: str, split: str) -> tuple[str, list[str], RawRows]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DataError(
            f"{path}: a directory, but not one written by datasets' save_to_disk ({e})"
        ) from None
    source = path
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; splits are {sorted(ds)}")
        ds, source = ds[split], f"{path} [{split}]"
    return source, list(ds.column_names), enumerate(iter(ds), start=1)


def _open_hub(name: str, split: str) -> tuple[str, list[str], RawRows]:
    import datasets

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(
            f"{name}: not a local file or directory, and hub datasets cannot be loaded with "
            "HF_HUB_OFFLINE=1 (download it and pass the path, or unset HF_HUB_OFFLINE)"
        )
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, missing split
        raise DataError(f"{name}: cannot load hub dataset split {split!r} ({e})") from None
    return f"{name} [{split}]", list(ds.column_names), enumerate(iter(ds), start=1)
