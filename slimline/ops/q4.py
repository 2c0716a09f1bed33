"""MatMulQ4's packed layout (slimline/ops/csrc/matmul_q4.cc reads it): what ``quantize.weight_only``
writes with ``kernel: slimline``, and what the numpy reference and the tests read back."""

from __future__ import annotations

import numpy as np

LANES = 16  # MatMulQ4's columns per group
BLOCK = 32  # weights per scale and minimum, along K


def fits(bits: int, block_size: int, k: int) -> bool:
    """Whether weights of this format can be MatMulQ4's: 4 bits, blocks of 32, K a multiple of 32."""
    return bits == 4 and block_size == BLOCK and k % BLOCK == 0


def pack_q4(q: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``MatMulQ4``'s operands from 4-bit codes ``q [N, K]`` (0..15) and float16 ``scales, mins [N, K/32]``
    (W = scale * q + min): columns in groups of 16 (N padded with zero columns). B ``[G, K/32, 256]``:
    byte ``c*64 + l*4 + t`` of group g, block b holds q[16g+l, 32b+8c+t] (low nibble) and
    q[16g+l, 32b+8c+4+t] (high nibble); scales and mins ``[G, K/32, 16]``."""
    n, k = q.shape
    nb, groups = k // 32, -(-n // LANES)
    padded = np.zeros((groups * LANES, k), np.uint8)
    padded[:n] = q
    # [g, l, b, c, half, t] -> [g, b, c, l, t, half]
    blocks = padded.reshape(groups, LANES, nb, 4, 2, 4).transpose(0, 2, 3, 1, 5, 4)
    b = (blocks[..., 0] | (blocks[..., 1] << 4)).astype(np.uint8).reshape(groups, nb, 256)

    def lanes(v: np.ndarray) -> np.ndarray:
        out = np.zeros((groups * LANES, nb), np.float16)
        out[:n] = v
        return np.ascontiguousarray(out.reshape(groups, LANES, nb).transpose(0, 2, 1))

    return b, lanes(scales), lanes(mins)


def unpack_q4(b: np.ndarray, scales: np.ndarray, mins: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``pack_q4``'s inverse: (q [N, K], scales [N, K/32], mins [N, K/32])."""
    groups, nb, _ = b.shape
    v = b.reshape(groups, nb, 4, LANES, 4)
    halves = np.stack([v & 15, v >> 4], -1)  # [g, b, c, l, t, half]
    q = halves.transpose(0, 3, 1, 2, 5, 4).reshape(groups * LANES, nb * 32)[:n]
    flat = lambda a: a.transpose(0, 2, 1).reshape(groups * LANES, nb)[:n]  # noqa: E731
    return q, flat(scales), flat(mins)
