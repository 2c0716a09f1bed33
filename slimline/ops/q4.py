"""MatMulQ4's and MatMulQ8's packed layout (slimline/ops/csrc/matmul_q4.cc reads it): what
``quantize.weight_only`` writes with ``kernel: slimline``, and what the numpy reference and the tests
read back."""

from __future__ import annotations

import numpy as np

LANES = 16  # the ops' columns per group
BLOCK = 32  # weights per scale and minimum, along K
BITS = (4, 8)  # MatMulQ4, MatMulQ8


def fits(bits: int, block_size: int, k: int) -> bool:
    """Whether weights of this format can be MatMulQ4's (4 bits) or MatMulQ8's (8 bits): blocks of 32, K a
    multiple of 32."""
    return bits in BITS and block_size == BLOCK and k % BLOCK == 0


def matmul_op(bits: int) -> str:
    """The op for codes of ``bits``: MatMulQ4 or MatMulQ8 (their tables' Gathers: GatherQ4, GatherQ8)."""
    return f"MatMulQ{bits}"


def pack(q: np.ndarray, scales: np.ndarray, mins: np.ndarray, bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ops' operands from codes ``q [N, K]`` (0..2**bits - 1) and float16 ``scales, mins [N, K/32]``
    (W = scale * q + min): columns in groups of 16 (N padded with zero columns); scales and mins
    ``[G, K/32, 16]``. B at 4 bits ``[G, K/32, 256]``: byte ``c*64 + l*4 + t`` of group g, block b holds
    q[16g+l, 32b+8c+t] (low nibble) and q[16g+l, 32b+8c+4+t] (high nibble); at 8 bits ``[G, K/32, 512]``:
    byte ``c*64 + l*4 + t`` (c = 0..7) holds q[16g+l, 32b+4c+t]."""
    n, k = q.shape
    nb, groups = k // BLOCK, -(-n // LANES)
    padded = np.zeros((groups * LANES, k), np.uint8)
    padded[:n] = q
    if bits == 4:
        # [g, l, b, c, half, t] -> [g, b, c, l, t, half]
        blocks = padded.reshape(groups, LANES, nb, 4, 2, 4).transpose(0, 2, 3, 1, 5, 4)
        b = (blocks[..., 0] | (blocks[..., 1] << 4)).astype(np.uint8).reshape(groups, nb, 256)
    elif bits == 8:
        # [g, l, b, c, t] -> [g, b, c, l, t]
        b = np.ascontiguousarray(padded.reshape(groups, LANES, nb, 8, 4).transpose(0, 2, 3, 1, 4)).reshape(groups, nb, 512)
    else:
        raise ValueError(f"the ops hold 4- or 8-bit codes, not {bits}")

    def lanes(v: np.ndarray) -> np.ndarray:
        out = np.zeros((groups * LANES, nb), np.float16)
        out[:n] = v
        return np.ascontiguousarray(out.reshape(groups, LANES, nb).transpose(0, 2, 1))

    return b, lanes(scales), lanes(mins)


def unpack(b: np.ndarray, scales: np.ndarray, mins: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``pack``'s inverse (the width from B's shape): (q [N, K], scales [N, K/32], mins [N, K/32])."""
    groups, nb, width = b.shape
    if width == 256:
        v = b.reshape(groups, nb, 4, LANES, 4)
        halves = np.stack([v & 15, v >> 4], -1)  # [g, b, c, l, t, half]
        q = halves.transpose(0, 3, 1, 2, 5, 4).reshape(groups * LANES, nb * BLOCK)[:n]
    else:
        q = b.reshape(groups, nb, 8, LANES, 4).transpose(0, 3, 1, 2, 4).reshape(groups * LANES, nb * BLOCK)[:n]
    flat = lambda a: a.transpose(0, 2, 1).reshape(groups * LANES, nb)[:n]  # noqa: E731
    return q, flat(scales), flat(mins)
