"""What the prepare_*.py scripts share: read a source's rows, convert each, write the `prompt` JSONL.

    rows = read_rows("openai/gsm8k", name="main", split="train")   # or a local .jsonl/.json/.parquet/.csv
    write_jsonl(convert_all(rows, convert), "data/gsm8k/train.jsonl")  # or a `save_to_disk` directory

A converter maps one source row to one output row, or raises ValueError naming what is wrong with it;
`convert_all` skips those rows and reports how many (and the first reasons).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator


def read_rows(source: str, *, name: str | None = None, split: str = "train") -> Iterator[dict]:
    """Rows of a local file (.jsonl, .json, .parquet, .csv), a `save_to_disk` directory, or a hub dataset
    (`datasets.load_dataset(source, name, split=split)`: needs the network)."""
    if os.path.isfile(source):
        suffix = os.path.splitext(source)[1].lower()
        if suffix == ".jsonl":
            with open(source) as f:
                return iter([json.loads(line) for line in f if line.strip()])
        if suffix == ".json":
            with open(source) as f:
                data = json.load(f)
            return iter(data if isinstance(data, list) else data.get(split, data.get("data", [])))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return iter(pq.read_table(source).to_pylist())
        if suffix == ".csv":
            with open(source, newline="") as f:
                return iter(list(csv.DictReader(f)))
        raise SystemExit(f"{source}: unsupported file type {suffix!r} (.jsonl, .json, .parquet, .csv, or a "
                         f"save_to_disk directory)")
    import datasets

    if os.path.isdir(source):
        ds = datasets.load_from_disk(source)
        return iter(ds[split] if isinstance(ds, datasets.DatasetDict) else ds)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SystemExit(f"{source}: not a local file or directory, and HF_HUB_OFFLINE=1 forbids the hub: "
                         f"download it and pass --source FILE")
    return iter(datasets.load_dataset(source, name, split=split))


def convert_all(rows: Iterable[dict], convert: Callable[[dict], dict], *, limit: int | None = None) -> list[dict]:
    """`convert` over the rows (the first `limit`), skipping the ones it rejects with a count on stderr."""
    out, bad = [], []
    for i, row in enumerate(rows, start=1):
        if limit is not None and len(out) == limit:
            break
        try:
            out.append(convert(row))
        except (KeyError, ValueError, TypeError) as e:
            bad.append(f"row {i}: {type(e).__name__}: {e}")
    if bad and not out:
        raise SystemExit(f"no row could be converted (the source's columns?); first: {bad[0]}")
    if bad:
        print(f"skipped {len(bad)} rows; first: " + "; ".join(bad[:3]), file=sys.stderr)
    return out


def write_jsonl(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} prompts to {path}")


def messages(system: str, user: str) -> list[dict]:
    """A chat prompt: the system prompt, then the problem (the chat template adds the generation prompt)."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user.strip()}]
