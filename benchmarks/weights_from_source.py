"""Carry an ONNX artifact's weights to a machine as a recipe over the source model instead of as bytes.

The lent GPU machines take at most 64 MiB per call, and a SmolLM2 fp16 artifact's external data is
257 MiB. Most of it is the float model's own tensors, cast to fp16, transposed or concatenated (a
packed QKV or gate/up MatMul), and the source model (the 94 MiB GGUF) has to travel anyway for the
torch baseline. So:

    # here: which source tensor(s) make each initializer, plus the bytes no rule explains (GPTQ int4)
    python benchmarks/weights_from_source.py plan runs/smollm2-fp16-cuda SAFETENSORS OUT_DIR
    # there, after slimline's loader has rebuilt the same float safetensors from the GGUF
    python benchmarks/weights_from_source.py rebuild RUN_DIR SAFETENSORS OUT_DIR

``rebuild`` writes ``model.onnx.data`` and checks its sha256 against the original's: a different
dequantization there fails loudly rather than giving a silently different model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _external(model: onnx.ModelProto) -> list[tuple[onnx.TensorProto, int, int]]:
    out = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out.append((t, int(info.get("offset", 0)), int(info["length"])))
    return out


def _source(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _candidates(source: dict[str, np.ndarray], dtype: np.dtype) -> dict[bytes, list[tuple[str, bool, int]]]:
    """First column's bytes -> (source name, transposed, width) for every 2-D source tensor, as ``dtype``."""
    index: dict[bytes, list[tuple[str, bool, int]]] = {}
    for name, w in source.items():
        if w.ndim != 2:
            continue
        for transposed in (False, True):
            m = (w.T if transposed else w).astype(dtype)
            index.setdefault(np.ascontiguousarray(m[:, 0]).tobytes(), []).append((name, transposed, m.shape[1]))
    return index


def _explain(array: np.ndarray, source: dict[str, np.ndarray], index: dict) -> list | None:
    """Parts [(source name, transposed)] whose column-concatenation, cast to array.dtype, equals array."""
    flat = {n: w for n, w in source.items() if w.shape == array.shape or (w.ndim == 1 and w.size == array.size)}
    for name, w in flat.items():
        if np.array_equal(w.astype(array.dtype).reshape(array.shape), array):
            return [(name, False)]
    if array.ndim != 2:
        return None
    parts, col = [], 0
    while col < array.shape[1]:
        for name, transposed, width in index.get(np.ascontiguousarray(array[:, col]).tobytes(), []):
            w = source[name]
            m = (w.T if transposed else w).astype(array.dtype)
            if m.shape[0] == array.shape[0] and np.array_equal(m, array[:, col : col + width]):
                parts.append((name, transposed))
                col += width
                break
        else:
            return None
    return parts


def plan(run_dir: Path, safetensors: Path, out: Path) -> int:
    model = onnx.load(run_dir / "model.onnx", load_external_data=False)
    data = run_dir / "model.onnx.data"
    source = _source(safetensors)
    out.mkdir(parents=True, exist_ok=True)
    raw = (out / "raw.bin").open("wb")
    entries, indexes, derived, carried = [], {}, 0, 0
    with data.open("rb") as f:
        for t, offset, length in _external(model):
            f.seek(offset)
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            array = np.frombuffer(f.read(length), dtype=dtype).reshape(tuple(t.dims))
            parts = None
            if dtype.kind == "f":
                if dtype not in indexes:
                    indexes[dtype] = _candidates(source, dtype)
                parts = _explain(array, source, indexes[dtype])
            entry = {"name": t.name, "offset": offset, "length": length, "dtype": str(dtype), "shape": list(t.dims)}
            if parts is None:
                entry["raw"] = raw.tell()
                raw.write(array.tobytes())
                carried += length
            else:
                entry["parts"] = parts
                derived += length
            entries.append(entry)
    raw.close()
    size = data.stat().st_size
    (out / "plan.json").write_text(json.dumps({"size": size, "sha256": _sha256(data), "entries": entries}, indent=1) + "\n")
    print(f"{run_dir}: {derived / 2**20:.1f} MiB derived from {safetensors.name}, {carried / 2**20:.1f} MiB carried")
    return 0


def rebuild(run_dir: Path, safetensors: Path, out: Path) -> int:
    spec = json.loads((out / "plan.json").read_text())
    source = _source(safetensors)
    target = run_dir / "model.onnx.data"
    staging = target.with_suffix(".data.partial")
    try:
        with staging.open("wb") as f, (out / "raw.bin").open("rb") as raw:
            f.truncate(spec["size"])
            for e in spec["entries"]:
                if "raw" in e:
                    raw.seek(e["raw"])
                    block = raw.read(e["length"])
                else:
                    dtype = np.dtype(e["dtype"])
                    cols = [(source[n].T if tr else source[n]).astype(dtype) for n, tr in e["parts"]]
                    block = (np.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]).reshape(e["shape"]).tobytes()
                if len(block) != e["length"]:
                    print(f"{e['name']}: rebuilt {len(block)} bytes, expected {e['length']}", file=sys.stderr)
                    return 1
                f.seek(e["offset"])
                f.write(block)
        got = _sha256(staging)
        if got != spec["sha256"]:
            print(
                f"{target}: rebuilt bytes differ from the original (sha256 {got[:12]}, not {spec['sha256'][:12]})",
                file=sys.stderr,
            )
            return 1
        staging.rename(target)
    finally:
        staging.unlink(missing_ok=True)
    print(f"{target}: rebuilt, sha256 matches the original")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["plan", "rebuild"])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("safetensors", type=Path, help="the float source model's model.safetensors")
    ap.add_argument("out", type=Path, help="folder for plan.json and raw.bin")
    a = ap.parse_args()
    return (plan if a.action == "plan" else rebuild)(a.run_dir, a.safetensors, a.out)


if __name__ == "__main__":
    sys.exit(main())
