"""The safetensors format, read lazily through a memory map and written in streaming fashion.

Reading maps the file and returns numpy views, so loading a shard of one tensor touches only its pages.
Every inconsistency (truncated file, bad header, offsets outside the file) raises `CheckpointError`
naming the file and tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

from polmjax.errors import UserError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(UserError, ValueError):
    """A checkpoint file or tensor that cannot be read as promised."""


class SafetensorsFile:
    """Lazy reader: `f.keys()`, `f.shape(name)`, `f.get(name)` -> numpy array backed by a memory map."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open safetensors file ({e})") from e
        if size < 8:
            raise CheckpointError(f"{self.path}: {size} bytes is too short for a safetensors file (truncated?)")
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise CheckpointError(f"{self.path}: header of {header_len} bytes exceeds the file size {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        for name, e in header.items():
            if not isinstance(e, dict) or {"dtype", "shape", "data_offsets"} - set(e):
                raise CheckpointError(f"{self.path}: header entry for {name!r} is malformed: {e!r}")
            if e["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
            begin, end = e["data_offsets"]
            nbytes = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - begin != nbytes or end > data_len or begin < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} spans bytes [{begin}, {end}) but needs {nbytes} bytes within "
                    f"{data_len} bytes of data (file truncated or corrupt)"
                )
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if data_len > 0 else np.zeros(0, np.uint8)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def get(self, name: str) -> np.ndarray:
        e = self._entry(name)
        begin, end = e["data_offsets"]
        raw = self._map[self._data_start + begin: self._data_start + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])

    def _entry(self, name: str) -> dict:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None


TensorPlan = tuple[str, tuple[int, ...], np.dtype]


def write_file(path: str, plan: Iterable[TensorPlan], produce: Callable[[str], np.ndarray],
               metadata: dict | None = None) -> None:
    """Write tensors in `plan` order; `produce(name)` is called once per tensor, just before it is written."""
    plan = list(plan)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, shape, dtype in plan:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in plan:
            arr = np.ascontiguousarray(produce(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: produced {arr.shape} {arr.dtype}, planned {tuple(shape)} {np.dtype(dtype)}")
            f.write(arr.tobytes())
    os.replace(tmp, path)
