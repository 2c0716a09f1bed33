"""Build slimline's custom-op library from source (``slimline ops build``; bin/ scripts run it once).

- ONNX Runtime's C/C++ API headers: from ``$SLIMLINE_ORT_HEADERS`` (a folder holding
  ``onnxruntime_cxx_api.h``, e.g. /usr/include/onnxruntime from Debian's libonnxruntime-dev), else
  Debian's ``libonnxruntime-dev`` 1.21 package, downloaded once and checked against its SHA-256. The
  C API is versioned, so a library built against 1.21's headers loads in 1.21 and every later
  ONNX Runtime (slimline pins 1.32; onnxruntime-gpu 1.31 runs it on GPUs).
- The CPU kernels: a C++17 compiler (``$CXX``, else c++/g++). Without one nothing is built, and the
  reason is logged; models that use the ops then fail with it, and nothing else changes.
- The CUDA kernels, where nvcc is found (``$CUDA_HOME/bin``, PATH, or pip's ``nvidia-cuda-nvcc``):
  a second library, ``libslimline_ops_cuda.so``, with the CPU kernels and SASS for the architectures
  in ``$SLIMLINE_CUDA_ARCHS`` (default ``80;90``, plus PTX of the last for newer GPUs). The CUDA
  runtime is linked statically: the library needs only the driver, and loads without one.

Builds go to a folder named by a hash of the sources, headers and flags under
``slimline.ops.cache_dir()``, so editing a kernel rebuilds it and nothing else is ever overwritten.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimline.ops import cache_dir

SOURCES = Path(__file__).parent / "csrc"
HEADERS_VERSION = "1.21.0"
HEADERS_URL = "http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
HEADERS_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
CPU_SOURCES = ("slimline_ops.cc", "matmul_q4.cc")
CXX_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden"]
EXPORTS = ["RegisterCustomOps", "SlimlineOpsProviders", "SlimlineOpsMatMulQ4Kernel"]


@dataclass
class Built:
    cpu: Path | None
    cuda: Path | None
    notes: list[str]


def _archs() -> list[str]:
    return [a.strip() for a in os.environ.get("SLIMLINE_CUDA_ARCHS", "80;90").split(";") if a.strip()]


def build_dir() -> Path:
    """This source tree's build folder (a hash of sources, header version, flags and CUDA archs)."""
    h = hashlib.sha256()
    for f in sorted(SOURCES.iterdir()) if SOURCES.is_dir() else []:
        h.update(f.name.encode() + f.read_bytes())
    h.update(" ".join([HEADERS_VERSION, *CXX_FLAGS, *_archs(), os.environ.get("SLIMLINE_ORT_HEADERS", "")]).encode())
    return cache_dir() / h.hexdigest()[:16]


def headers(say: Callable[[str], None]) -> Path:
    """A folder holding ONNX Runtime's C/C++ API headers (downloaded and verified once)."""
    given = os.environ.get("SLIMLINE_ORT_HEADERS")
    if given:
        if not (Path(given) / "onnxruntime_cxx_api.h").is_file():
            raise RuntimeError(f"SLIMLINE_ORT_HEADERS={given} holds no onnxruntime_cxx_api.h")
        return Path(given)
    folder = cache_dir() / f"onnxruntime-headers-{HEADERS_VERSION}"
    if (folder / "onnxruntime_cxx_api.h").is_file():
        return folder
    say(f"downloading ONNX Runtime {HEADERS_VERSION}'s headers (Debian libonnxruntime-dev, 85 kB)")
    try:
        with urllib.request.urlopen(HEADERS_URL, timeout=20) as r:
            deb = r.read()
    except OSError as e:
        raise RuntimeError(
            f"could not download {HEADERS_URL} ({e}); set SLIMLINE_ORT_HEADERS to a folder with onnxruntime_cxx_api.h"
        ) from None
    digest = hashlib.sha256(deb).hexdigest()
    if digest != HEADERS_SHA256:
        raise RuntimeError(f"{HEADERS_URL}: SHA-256 {digest}, expected {HEADERS_SHA256}; not using it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    with tarfile.open(fileobj=io.BytesIO(_ar_member(deb, b"data.tar"))) as tar:
        for m in tar.getmembers():
            if m.isfile() and "/usr/include/onnxruntime/" in m.name and m.name.endswith(".h"):
                rel = m.name.split("/usr/include/onnxruntime/", 1)[1]
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
    if not (tmp / "onnxruntime_cxx_api.h").is_file():
        shutil.rmtree(tmp)
        raise RuntimeError(f"{HEADERS_URL} held no onnxruntime_cxx_api.h")
    try:
        tmp.rename(folder)
    except OSError:  # another build got there first
        shutil.rmtree(tmp)
    return folder


def _ar_member(data: bytes, prefix: bytes) -> bytes:
    """The first member of an ar archive (a .deb) whose name starts with ``prefix``."""
    if not data.startswith(b"!<arch>\n"):
        raise RuntimeError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        name, size = data[pos : pos + 16].strip(), int(data[pos + 48 : pos + 58])
        if name.startswith(prefix):
            return data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise RuntimeError(f"no {prefix.decode()} member in the package")


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    if shutil.which("nvcc"):
        return shutil.which("nvcc")
    try:  # pip install nvidia-cuda-nvcc
        import nvidia.cuda_nvcc  # type: ignore[import-not-found]

        for root in nvidia.cuda_nvcc.__path__:
            if (Path(root) / "bin" / "nvcc").is_file():
                return str(Path(root) / "bin" / "nvcc")
    except ImportError:
        pass
    return None


def _compile(cmd: list[str], out: Path, log: io.TextIOBase) -> None:
    """Run one compiler command writing ``out`` through a temporary name (no half-written library)."""
    tmp = out.with_name(out.name + ".tmp")
    full = [c if c != "@OUT" else str(tmp) for c in cmd]
    log.write("$ " + " ".join(full) + "\n")
    r = subprocess.run(full, capture_output=True, text=True)
    log.write(r.stdout + r.stderr)
    if r.returncode:
        tmp.unlink(missing_ok=True)
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise RuntimeError(f"{Path(full[0]).name} failed: {detail[0] if detail else r.returncode}")
    tmp.rename(out)


def build(cuda: bool = True, force: bool = False, say: Callable[[str], None] = print) -> Built:
    """Build what this machine can (CPU library; CUDA library where nvcc is found). Never raises for a
    missing tool or download: the reason goes to the notes and to build.log, and the library is absent."""
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cpu_lib, cuda_lib = folder / "libslimline_ops.so", folder / "libslimline_ops_cuda.so"
    notes: list[str] = []
    if not (SOURCES / "slimline_ops.cc").is_file():
        return Built(None, None, [f"no custom ops: their sources are not installed ({SOURCES} is missing)"])
    with open(folder / "build.log", "a") as log:
        try:
            include = headers(say)
        except RuntimeError as e:
            notes.append(f"no custom ops: ONNX Runtime headers unavailable ({e})")
            log.write(notes[-1] + "\n")
            return Built(None, None, notes)
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if force or not cpu_lib.is_file():
            if not cxx:
                notes.append("no custom ops: no C++ compiler found (install g++, or set CXX)")
                log.write(notes[-1] + "\n")
                return Built(None, None, notes)
            say("building slimline's custom ops (CPU kernels)")
            try:
                cpu_sources = [str(SOURCES / name) for name in CPU_SOURCES]
                _compile([cxx, *CXX_FLAGS, f"-I{include}", *cpu_sources, "-o", "@OUT"], cpu_lib, log)
            except RuntimeError as e:
                notes.append(f"no custom ops: {e} (full output in {folder / 'build.log'})")
                log.write(notes[-1] + "\n")
                return Built(None, None, notes)
        nvcc = find_nvcc() if cuda else None
        if cuda and not nvcc:
            notes.append("CPU kernels only: nvcc not found (pip install nvidia-cuda-nvcc, or set CUDA_HOME)")
        if nvcc and (force or not cuda_lib.is_file()):
            archs = _archs()
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs] + [
                f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"
            ]
            say(f"building slimline's custom ops (CUDA kernels, sm_{', sm_'.join(archs)}; a minute)")
            cmd = [nvcc, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-cudart", "static"]
            cmd += [*gencode, "-DSLIMLINE_OPS_CUDA", f"-I{include}", f"-I{SOURCES}"]
            cmd += [*(str(SOURCES / name) for name in CPU_SOURCES), str(SOURCES / "skip_rms_norm.cu"), "-o", "@OUT"]
            try:
                _compile(cmd, cuda_lib, log)
            except RuntimeError as e:
                notes.append(f"CPU kernels only: the CUDA build failed: {e} (full output in {folder / 'build.log'})")
        if notes:
            log.write("\n".join(notes) + "\n")
    return Built(cpu_lib if cpu_lib.is_file() else None, cuda_lib if cuda_lib.is_file() else None, notes)


def main(argv: list[str] | None = None) -> int:
    """``python -m slimline.ops.build [--auto] [--no-cuda] [--force]``: what bin/_bootstrap.sh runs (always
    exit 0: a machine without compilers still gets a working slimline, without the ops). With ``--auto``
    (bin/ scripts) a source tree whose build was already tried is left alone: an offline machine does
    not wait for the header download on every command; ``slimline ops build`` tries again."""
    argv = sys.argv[1:] if argv is None else argv
    if "--auto" in argv and (build_dir() / "build.log").is_file():
        return 0
    built = build(cuda="--no-cuda" not in argv, force="--force" in argv, say=lambda m: print(f"slimline: {m}", file=sys.stderr))
    for note in built.notes:
        print(f"slimline: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
