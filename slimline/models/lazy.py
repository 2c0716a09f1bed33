"""A safetensors checkpoint read one tensor at a time: the streaming path never holds the float model.

``Checkpoint(folder)`` reads the headers of every shard (``model.safetensors`` or the shards named by
``model.safetensors.index.json``) and checks them before anything is computed: every shard the index
names is present, no two shards hold one tensor, and each shard is as long as its header says (a
truncated download is named with the bytes it lacks). ``read(name)`` then returns one tensor as a
float32 numpy array (bf16 and fp16 are widened exactly), read with ``os.pread`` into a fresh buffer:
no memory map, so the resident memory of the process is that tensor and no more, and the page cache
keeps what the kernel decides.

safetensors' own ``safe_open`` memory-maps the file: each tensor it returns stays resident in the
process (counted in its RSS) for as long as the mapping is open, which over an 8B-parameter model
is the whole 16 GB. The format is a u64 header length, a JSON header (``dtype``, ``shape``,
``data_offsets`` per tensor) and the data, so reading it directly is a few lines.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimline.errors import ModelError

INDEX = "model.safetensors.index.json"
_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    length: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: not a safetensors file ({size} bytes, no header). Download it again.")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise ModelError(
                f"{path}: the safetensors header says {n} bytes, the file has {size}: the file is damaged. Download it again."
            )
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ModelError(
                f"{path}: the safetensors header is not valid JSON: the file is damaged. Download it again."
            ) from None
    return header, 8 + n


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an index of shards), read on demand."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                mapping = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise ModelError(f"{index}: not a safetensors index (no `weight_map`). Download it again.") from None
            files = sorted(set(mapping.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            mapping = None
        if not files:
            raise ModelError(
                f"{self.folder}: no safetensors weights (model.safetensors or {INDEX}). The streaming path reads "
                "safetensors only; convert .bin weights with `model.save_pretrained(folder, safe_serialization=True)`."
            )
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise ModelError(
                f"{self.folder}: the index names {len(missing)} shard(s) that are not there: {', '.join(missing[:5])}. "
                "The download is incomplete; fetch the missing files."
            )
        self.entries: dict[str, Entry] = {}
        for name in files:
            path = self.folder / name
            header, base = _header(path)
            end = base
            for key, spec in header.items():
                if key == "__metadata__":
                    continue
                if key in self.entries:
                    raise ModelError(
                        f"{path}: tensor `{key}` is also in {self.entries[key].file.name}; the checkpoint is inconsistent."
                    )
                if spec["dtype"] not in _DTYPES:
                    raise ModelError(f"{path}: tensor `{key}` has dtype {spec['dtype']}, which the streaming path does not read.")
                a, b = spec["data_offsets"]
                self.entries[key] = Entry(path, spec["dtype"], tuple(spec["shape"]), base + a, b - a)
                end = max(end, base + b)
            size = path.stat().st_size
            if size < end:
                raise ModelError(
                    f"{path}: truncated: its header describes {end:,} bytes, the file has {size:,} "
                    f"({end - size:,} missing). Download it again."
                )
        if mapping is not None:
            absent = sorted(k for k in mapping if k not in self.entries)
            if absent:
                raise ModelError(
                    f"{index}: {len(absent)} tensor(s) it lists are in no shard (e.g. `{absent[0]}`). Download the checkpoint again."
                )

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.length for e in self.entries.values())

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries.values())

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor, float tensors as float32 (a fresh array, owned by the caller); ``rows=(a, b)``
        reads rows ``a:b`` of its first axis only."""
        e = self.entries[name]
        shape, start, length = e.shape, e.start, e.length
        if rows is not None:
            per_row = e.length // e.shape[0]
            shape = (rows[1] - rows[0], *e.shape[1:])
            start, length = e.start + rows[0] * per_row, (rows[1] - rows[0]) * per_row
        raw = np.empty(length, np.uint8)
        with open(e.file, "rb") as f:
            got = os.preadv(f.fileno(), [memoryview(raw)], start)
        if got != length:
            raise ModelError(
                f"{e.file}: tensor `{name}` ends past the end of the file: the shard is truncated. Download it again."
            )
        values = raw.view(_DTYPES[e.dtype]).reshape(shape)
        if e.dtype == "BF16":  # the high half of a float32
            out = np.empty(shape, np.float32)
            out.view(np.uint32)[...] = values.astype(np.uint32) << 16
            return out
        if values.dtype in (np.float16, np.float64):
            return values.astype(np.float32)
        return values


def checkpoint_name(fqn: str, ckpt: Checkpoint, tied: dict[str, str]) -> str | None:
    """The checkpoint tensor for the torch parameter ``fqn``: as is, or the one it is tied to."""
    if fqn in ckpt:
        return fqn
    if fqn in tied and tied[fqn] in ckpt:
        return tied[fqn]
    return None


def write_safetensors(path: Path, tensors: dict[str, Any], dtype: str = "BF16") -> None:
    """Write float32 arrays as one safetensors file (``BF16`` rounds to nearest even; ``F32`` as is).
    A value may be ``(shape, make)``: ``make()`` is called when that tensor is written, so a file of
    many GB is written one tensor at a time. Used by the scale benchmark and the tests (no torch)."""
    header: dict = {}
    offset = 0
    width = 2 if dtype == "BF16" else 4
    for name, value in tensors.items():
        shape = list(value[0] if isinstance(value, tuple) else value.shape)
        n = int(np.prod(shape, dtype=np.int64)) * width
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for value in tensors.values():
            array = value[1]() if isinstance(value, tuple) else value
            f.write(to_bf16(array).tobytes() if dtype == "BF16" else np.ascontiguousarray(array, np.float32).tobytes())


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
