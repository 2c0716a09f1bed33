"""Shrink a CUDA library for one GPU generation, so that onnxruntime-gpu fits a 64 MiB device call.

onnxruntime-gpu's ``libonnxruntime_providers_cuda.so`` (284 MB in 1.31.1) holds compiled kernels
(SASS) for every GPU architecture it supports, in the ELF section ``.nv_fatbin``. This zeroes the
SASS of every architecture except those kept, leaving the file's layout and the PTX untouched; the
zeros then compress away. For a Hopper machine (sm_90):

    python benchmarks/trim_cuda_kernels.py LIB.so              # list what the fat binary holds
    python benchmarks/trim_cuda_kernels.py LIB.so 90 OUT.so    # keep sm_90's SASS only
    tar cJf ort.tar.xz onnxruntime/ onnxruntime_gpu-*.dist-info/   # 59 MiB (from the 256 MB wheel)

The trimmed library runs only on the kept architectures (and, through the PTX, on ones the driver
can JIT for). It is a transfer trick for the lent GPU machines, not something to ship.
"""

from __future__ import annotations

import argparse
import collections
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

MAGIC = 0xBA55ED50  # a fat binary container's header
PTX, SASS = 1, 2  # entry kinds


def fatbin_section(path: Path) -> tuple[int, int]:
    """(file offset, size) of the ``.nv_fatbin`` section, read with readelf."""
    out = subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if ".nv_fatbin" in line:
            fields = line.split("]", 1)[1].split()
            return int(fields[3], 16), int(fields[4], 16)
    raise SystemExit(f"{path}: no .nv_fatbin section (not a CUDA library?)")


def entries(data: bytes | bytearray, start: int, size: int) -> Iterator[tuple[int, int, int, int]]:
    """(payload offset, payload size, kind, sm architecture) for each entry of each container."""
    pos, end = start, start + size
    while pos < end:
        magic, _version, header, body = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:
            pos += 8  # containers are 8-byte aligned
            continue
        e, stop = pos + header, pos + header + body
        while e < stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, e)
            if entry_header == 0:
                break
            arch = struct.unpack_from("<I", data, e + 28)[0]
            yield e + entry_header, payload, kind, arch
            e += entry_header + payload
        pos = stop


def trim(data: bytearray, start: int, size: int, keep: set[int]) -> int:
    """Zero the SASS of every architecture not in ``keep``; returns the bytes zeroed."""
    zeroed = 0
    for offset, payload, kind, arch in entries(data, start, size):
        if kind == SASS and arch not in keep:
            data[offset : offset + payload] = bytes(payload)
            zeroed += payload
    return zeroed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("library", type=Path)
    ap.add_argument("keep", nargs="?", help="comma list of sm architectures to keep, e.g. 90 or 80,90")
    ap.add_argument("out", nargs="?", type=Path)
    a = ap.parse_args()
    if (a.keep is None) != (a.out is None):
        ap.error("give both KEEP and OUT, or neither to list")
    data = bytearray(a.library.read_bytes())
    start, size = fatbin_section(a.library)
    sizes: collections.Counter = collections.Counter()
    for _, payload, kind, arch in entries(data, start, size):
        sizes[("PTX" if kind == PTX else "SASS", arch)] += payload
    for (kind, arch), n in sorted(sizes.items()):
        print(f"{kind:4} sm_{arch}: {n / 1e6:.1f} MB")
    if a.out:
        zeroed = trim(data, start, size, {int(x) for x in a.keep.split(",")})
        a.out.write_bytes(data)
        print(f"zeroed {zeroed / 1e6:.1f} MB; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
