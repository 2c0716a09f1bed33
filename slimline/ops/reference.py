"""numpy references of slimline's custom ops: the definition the CPU and CUDA kernels are tested against."""

from __future__ import annotations

import numpy as np

from slimline.ops.q4 import unpack


def skip_rms_norm(x: np.ndarray, skip: np.ndarray, gamma: np.ndarray, epsilon: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``SkipRMSNorm``: (output, input + skip). The sum is rounded to the input type (as an unfused Add
    would be); the mean square of that rounded sum is taken in float32 whatever the type."""
    dtype = x.dtype
    s = (x.astype(np.float32) + skip.astype(np.float32)).astype(dtype)
    v = s.astype(np.float32)
    inv = 1.0 / np.sqrt((v * v).mean(-1, keepdims=True, dtype=np.float32) + np.float32(epsilon))
    return (v * inv * gamma.astype(np.float32)).astype(dtype), s


def quantize_rows_int8(x: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``x [rows, K]`` in int8 per block of ``block``: (codes [rows, K], scales [rows, K/block]);
    scale = max|x| / 127, codes = round-half-even(x * 127 / max|x|) (an all-zero block: zeros)."""
    rows, k = x.shape
    xb = x.astype(np.float32).reshape(rows, k // block, block)
    amax = np.abs(xb).max(-1)
    safe = np.where(amax == 0, np.float32(1), amax)
    inv = np.where(amax == 0, np.float32(0), np.float32(127) / safe).astype(np.float32)
    codes = np.clip(np.rint(xb * inv[..., None]), -127, 127).astype(np.int8)
    return codes.reshape(rows, k), (amax / np.float32(127)).astype(np.float32)


def dequantize_q4(b: np.ndarray, scales: np.ndarray, mins: np.ndarray, n: int) -> np.ndarray:
    """The float weights ``[N, K]`` that ``MatMulQ4``'s (``MatMulQ8``'s) packed operands hold."""
    q, s, m = unpack(b, scales, mins, n)
    nb = s.shape[1]
    w = q.reshape(n, nb, 32).astype(np.float32) * s.astype(np.float32)[..., None] + m.astype(np.float32)[..., None]
    return w.reshape(n, nb * 32)


def matmul_q4(a: np.ndarray, b: np.ndarray, scales: np.ndarray, mins: np.ndarray, n: int) -> np.ndarray:
    """``MatMulQ4`` / ``MatMulQ8``: ``a [..., K]`` times the packed 4- or 8-bit weights (``q4.pack``) of N columns. The rows of
    ``a`` go to int8 per block of 32 first (``quantize_rows_int8``); a block contributes
    scale * xscale * sum(q * xcode) + min * xscale * sum(xcode): the dequantized weights times the
    rounded activations."""
    q, s, m = unpack(b, scales, mins, n)
    nb = s.shape[1]
    k = nb * 32
    x = a.reshape(-1, k).astype(np.float32)
    codes, xscale = quantize_rows_int8(x)
    dots = np.einsum("rbi,nbi->rnb", codes.reshape(-1, nb, 32).astype(np.int32), q.reshape(n, nb, 32).astype(np.int32))
    sums = xscale * codes.reshape(-1, nb, 32).sum(-1, dtype=np.int32).astype(np.float32)  # the rounded activations
    y = (dots.astype(np.float32) * (s.astype(np.float32)[None] * xscale[:, None, :])).sum(-1) + sums @ m.astype(np.float32).T
    return y.reshape(*a.shape[:-1], n).astype(np.float32)


def gather_q4(b: np.ndarray, scales: np.ndarray, mins: np.ndarray, n: int, indices: np.ndarray) -> np.ndarray:
    """``GatherQ4`` / ``GatherQ8``: rows ``indices`` of the ``[N, K]`` table held in MatMulQ4's (Q8's) packed layout."""
    return dequantize_q4(b, scales, mins, n)[np.asarray(indices)]
