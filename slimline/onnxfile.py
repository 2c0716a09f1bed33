"""Saving an ONNX model with its weights in one external file, each byte range stored once.

ONNX Runtime memory-maps external weights on Linux, so a weight costs resident memory only for
the pages a kernel touches. Two things follow, which ``onnx.save_model`` does not do:

- **Views.** A tensor whose bytes are a contiguous range of another's (marked with
  ``mark_view``) points into that tensor's bytes instead of being written again. The decoder's tied
  LM head and its embedding table use this: the head's MatMulNBits parts and the embedding's
  GatherBlockQuantized table are different initializers over the same bytes. ONNX Runtime prepacks
  the head's parts into its own layout and releases them, while the embedding's mapping stays
  mostly untouched: a Gather reads only the rows of the tokens it sees.
- **Exact duplicates** are written once too.

Large tensors start on 4 KiB boundaries, so that each can be mapped on its own pages.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

VIEW = "slimline:view-of:"
ALIGN = 4096
THRESHOLD = 1024  # smaller tensors stay inline


def mark_view(tensor: Any, base: str, offset: int = 0) -> None:
    """Record that ``tensor``'s bytes are ``base``'s bytes from ``offset`` on (checked when saving)."""
    tensor.doc_string = f"{VIEW}{base}:{offset}"


def view_of(tensor: Any) -> tuple[str, int] | None:
    if not tensor.doc_string.startswith(VIEW):
        return None
    base, _, offset = tensor.doc_string[len(VIEW) :].rpartition(":")
    return base, int(offset)


def _raw(tensor: Any) -> bytes:
    """The tensor's little-endian bytes, moving typed fields (float_data, ...) into raw_data first."""
    from onnx import numpy_helper

    if not tensor.HasField("raw_data"):
        fresh = numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
        fresh.doc_string = tensor.doc_string
        tensor.CopyFrom(fresh)
    return tensor.raw_data


# a stage's graph above this size is written with its weights in external data (protobuf's limit is 2 GB)
INLINE_LIMIT = 1_500_000_000


def save_stage(model: Any, path: Path) -> Any:
    """Write a stage's graph: inline when it is small, else with its weights in ``model.onnx.data``
    beside it. Returns the model to go on with (reloaded when the write moved its weights out)."""
    import onnx

    if model.ByteSize() <= INLINE_LIMIT:
        onnx.save_model(model, str(path))
        return model
    save(model, Path(path), external=True, location=f"{Path(path).name}.data")
    return onnx.load(str(path))


def save(model: Any, path: Path, external: bool, location: str = "model.onnx.data") -> dict[str, int]:
    """Write ``model`` to ``path``; with ``external``, its weights to ``location`` beside it.

    Returns byte counts: ``written`` (the data file), ``shared`` (bytes of views and duplicates that
    point at bytes already written). Views whose bytes do not match their base are written whole.
    """
    import onnx
    from onnx import TensorProto

    path = Path(path)
    stats = {"written": 0, "shared": 0}
    inits = list(model.graph.initializer)
    if not external:
        for t in inits:
            if view_of(t):
                t.doc_string = ""
        onnx.save_model(model, str(path))
        return stats
    raw = {t.name: _raw(t) for t in inits if t.data_type != TensorProto.STRING}
    placed: dict[str, int] = {}  # name -> offset in the data file
    by_digest: dict[bytes, str] = {}
    with open(path.parent / location, "wb") as f:
        for t in sorted(inits, key=lambda t: view_of(t) is not None):  # bases before their views
            data = raw.get(t.name)
            view = view_of(t)
            t.doc_string = ""
            if data is None or len(data) < THRESHOLD:
                continue
            offset = None
            if view and view[0] in placed:
                base, at = view
                if raw[base][at : at + len(data)] == data:
                    offset = placed[base] + at
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if offset is None and digest in by_digest and raw[by_digest[digest]] == data:
                offset = placed[by_digest[digest]]
            if offset is None:
                pad = -f.tell() % ALIGN if len(data) >= ALIGN else 0
                f.write(b"\0" * pad)
                offset = f.tell()
                f.write(data)
                stats["written"] += len(data)
                by_digest.setdefault(digest, t.name)
            else:
                stats["shared"] += len(data)
            placed[t.name] = offset
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(model, str(path))
    return stats
