"""slimline's own ONNX Runtime custom ops (domain ``ai.slimline``): C++/CUDA kernels built from source.

ONNX Runtime's contrib kernels cover most of what slimline fuses into; this library holds the ops
where they fall short:

- ``SkipRMSNorm(input, skip, gamma) -> (output, input_skip_sum?)``: com.microsoft's
  SkipSimplifiedLayerNormalization without bias, with the mean square accumulated in fp32 whatever
  the dtype, so that an fp16 row whose mean square passes 65504 (the "massive activation" decoder LLMs
  put on the first position) can't turn into inf. ``quantize.fp16`` keeps ONNX Runtime's Skip norms
  with such rows in fp32 behind a Cast on each side, on the reading that its CUDA kernel sums in the
  input type (a single-op test on onnxruntime-gpu 1.31.1 did not reproduce that at SmolLM2's width:
  docs/ops.md); with this op they stay fp16 either way.

- ``MatMulQ4(A, B, scales, mins) -> Y``: float activations times 4-bit weights with a float16 scale
  and a float16 minimum per block of 32 (GGUF's Q4_1), in a column-interleaved layout
  (``q4.pack``); a CPU kernel for decode and prompts (AVX-512 VNNI, AVX2, portable C++).
  MatMulNBits can't hold a float minimum on its fast path, and once packed it reads 24 bytes per 32
  weights to this op's 20. ``quantize.weight_only`` writes it with ``kernel: slimline``.
- ``MatMulQ8(A, B, scales, mins) -> Y``: the same kernel and layout with 8-bit codes, so that a
  GGUF's Q8_0 tensors (int8 codes and a float16 scale per 32: codes + 128, minimum -128 * scale)
  come back exactly; ``kernel: slimline`` writes it for 8-bit layers in blocks of 32.
- ``GatherQ4`` / ``GatherQ8(B, scales, mins, indices) -> Y``: rows of a MatMulQ4 / MatMulQ8 table, so
  that a tied LM head's weights serve as the token embedding.

Every op has a CPU kernel, a CUDA kernel where nvcc was found at build time (SkipRMSNorm), and a
numpy reference (``reference``) that the tests hold them to. ``slimline ops build`` compiles the
library (``slimline.ops.build``); ``library()`` finds it, and ``slimline.runtime.ort_session``
registers it with any session whose model uses the domain.
"""

from __future__ import annotations

import os
from pathlib import Path

from slimline.errors import SlimlineError

DOMAIN = "ai.slimline"
OPS = ("SkipRMSNorm", "MatMulQ4", "MatMulQ8", "GatherQ4", "GatherQ8")
LIBRARY_ENV = "SLIMLINE_OPS_LIB"  # an explicit library path (a build carried to another machine)


class OpsUnavailable(SlimlineError):
    """The custom-op library is needed but was not built here (user-fixable: no traceback)."""


def cache_dir() -> Path:
    """Where builds live: $SLIMLINE_CACHE, else ~/.cache/slimline."""
    root = os.environ.get("SLIMLINE_CACHE") or Path.home() / ".cache" / "slimline"
    return Path(root) / "ops"


def library(cuda: bool = False) -> Path | None:
    """The built library: with ``cuda``, the CUDA build where there is one (it holds the CPU kernels
    too), else the CPU build; None when nothing is built for the current sources."""
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    from slimline.ops.build import build_dir

    folder = build_dir()
    for name in (["libslimline_ops_cuda.so"] if cuda else []) + ["libslimline_ops.so"]:
        if (folder / name).is_file():
            return folder / name
    return None


def matmul_q4_kernel() -> str | None:
    """The CPU kernel MatMulQ4 and MatMulQ8 run on this machine (avx512vnni, avx2 or portable), from the built library."""
    import ctypes

    path = library()
    if path is None:
        return None
    fn = getattr(ctypes.CDLL(str(path)), "SlimlineOpsMatMulQ4Kernel", None)
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def why_unavailable() -> str:
    """The reason the last build left no library (its log's last line), or how to build one."""
    from slimline.ops.build import build_dir

    log = build_dir() / "build.log"
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return "not built yet: run `slimline ops build`"


def require(cuda: bool = False) -> Path:
    """The library's path, or OpsUnavailable naming the reason and the fix."""
    path = library(cuda)
    if path is None:
        raise OpsUnavailable(
            f"the model uses slimline's custom ops ({DOMAIN}), whose library is not built here ({why_unavailable()}). "
            "Run `slimline ops build` (it needs a C++ compiler; the ops' CUDA kernels need nvcc), or rebuild the "
            "model without `custom_ops`."
        )
    return path


def uses_ops(path: Path) -> bool:
    """Whether the ONNX file at ``path`` mentions the ai.slimline domain (its opset imports and nodes do).
    A byte search: a false positive only registers the library with a session that doesn't need it."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(DOMAIN.encode()) >= 0
    except (OSError, ValueError):  # unreadable or empty: ORT will say what is wrong with it
        return False
