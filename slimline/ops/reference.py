"""numpy references of slimline's custom ops: the definition the CPU and CUDA kernels are tested against."""

from __future__ import annotations

import numpy as np


def skip_rms_norm(x: np.ndarray, skip: np.ndarray, gamma: np.ndarray, epsilon: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``SkipRMSNorm``: (output, input + skip). The sum is rounded to the input type (as an unfused Add
    would be); the mean square of that rounded sum is taken in float32 whatever the type."""
    dtype = x.dtype
    s = (x.astype(np.float32) + skip.astype(np.float32)).astype(dtype)
    v = s.astype(np.float32)
    inv = 1.0 / np.sqrt((v * v).mean(-1, keepdims=True, dtype=np.float32) + np.float32(epsilon))
    return (v * inv * gamma.astype(np.float32)).astype(dtype), s
