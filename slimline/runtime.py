"""ONNX Runtime sessions with slimline's settings, shared by every layer (fusion, quantization, evaluation)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

Feeds = dict[str, np.ndarray]

# Session settings slimline measures with and recommends for serving (the run folder's manifest lists
# them as `ort_session_config`): see ort_session.
SERVING_CONFIG = {"session.set_denormal_as_zero": "1"}


def ort_session(
    path: Path,
    threads: int = 0,
    providers: list[str] | None = None,
    spinning: bool = True,
    profile: Path | None = None,
    optimized_to: Path | None = None,
):
    """An ORT session. ``spinning=False`` for timing several sessions side by side in one process.

    Every session flushes denormal floats to zero in ORT's threads (``SERVING_CONFIG``), as GPU and
    oneDNN inference do by default. ONNX Runtime leaves them on, and its CPU attention meets them on
    padded batches: MiniLM int8 on Shakespeare lines padded to 128 tokens ran 1.49x (b32) and 1.64x
    (b1) faster with them flushed, with bit-identical outputs; unpadded batches ran at the same speed
    (Xeon, 2026-12-04, ``benchmarks/denormals.py``). Only values below 1.2e-38 can change. ORT applies
    the first session's setting to the calling thread for the whole process (a ``call_once``), so every
    slimline session sets it alike.

    ORT's worker threads spin for a while after each run. With several sessions alive, the idle
    ones' spinning threads take the cores the timed one needs: on this 2-core machine a SmolLM2
    decode step took ~30 ms with three spinning sessions alive, 13 ms with spinning off, and 9-10
    ms in a lone spinning session. Serving keeps one session, so spinning stays on by default;
    side-by-side comparisons turn it off for every variant alike. ``profile``: ORT's profiler on, its
    JSON written under that file prefix (``session.end_profiling()`` returns the path).
    ``optimized_to``: the graph ORT runs after its own load-time rewrites, saved to that file.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ORT picks (all physical cores)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in SERVING_CONFIG.items():
        options.add_session_config_entry(key, value)
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
    providers = providers or ["CPUExecutionProvider"]
    register_ops(options, path, providers)
    return ort.InferenceSession(str(path), options, providers=providers)


def register_ops(options: Any, path: Path, providers: list) -> None:
    """Register slimline's custom-op library with ``options`` when the model at ``path`` uses it (the
    CUDA build when a CUDA provider is asked for and one exists); OpsUnavailable when it isn't built."""
    from slimline.ops import require, uses_ops

    if uses_ops(Path(path)):
        cuda = any((p[0] if isinstance(p, tuple) else p) == "CUDAExecutionProvider" for p in providers)
        options.register_custom_ops_library(str(require(cuda)))


def float_dtype(arg: Any) -> type:
    """The numpy float type of an ORT session input or output (fp16 or fp32)."""
    return np.float16 if arg.type == "tensor(float16)" else np.float32


def ort_function(path: Path, threads: int = 0) -> tuple[Callable[[Feeds], dict[str, np.ndarray]], list[str]]:
    """A function running the ONNX model at ``path`` on ORT's CPU EP, and its input names.

    Float feeds are cast to the dtype each input declares (an fp16 decoder's KV cache), so that one set
    of feeds serves a graph and its fp16 conversion alike."""
    session = ort_session(path, threads)
    inputs = [i.name for i in session.get_inputs()]
    halves = {i.name for i in session.get_inputs() if float_dtype(i) is np.float16}
    outputs = [o.name for o in session.get_outputs()]

    def run(feeds: Feeds) -> dict[str, np.ndarray]:
        given = {k: feeds[k].astype(np.float16) if k in halves else feeds[k] for k in inputs}
        return dict(zip(outputs, session.run(outputs, given), strict=True))

    return run, inputs


@contextmanager
def quiet() -> Iterator[None]:
    """Silence library warnings and INFO/WARNING logs inside a call whose chatter we replace with a report."""
    names = ["", "optimum", "transformers", "torch.onnx", "onnxruntime", "fusion_attention", "onnx_model", "fusion_utils"]
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
