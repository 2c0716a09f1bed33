"""Group-wise n-bit weights (RTN, HQQ, GPTQ) and their packing into ONNX Runtime's ``MatMulNBits``.

A MatMul weight ``W`` is ``[K, N]`` (inputs x outputs). Each output column is cut into blocks of
``block_size`` inputs; each block has a float scale and a zero point, and every weight is stored as an
unsigned ``bits``-bit code ``q`` with ``w ~= (q - zero) * scale``. All three algorithms produce the same
``Blocked`` codes, so there is one packer, one dequantizer and one error report for all of them.

- RTN: round to nearest with the block's min/max (asymmetric) or absmax (symmetric) range.
- HQQ (half-quadratic quantization, Badri & Shaji 2023): keeps RTN's scale and optimises a float zero
  point per block with a proximal solver on an l_p (p<1) reconstruction error, which discounts the
  few large weights that RTN's range is built around. No calibration data.
- GPTQ (Frantar et al. 2022): quantizes the input dimension one column at a time and spreads each
  column's rounding error over the not-yet-quantized columns through the inverse Hessian ``2 X^T X``
  of the layer's calibration inputs, with damping and (optionally) act-order. Written here because
  ONNX Runtime's GPTQ path depends on Intel Neural Compressor's removed ``adaptor`` module.

The ``MatMulNBits`` layout (com.microsoft, see ONNX Runtime's ContribOperators.md): ``B`` is uint8
``[N, n_blocks, block_size * bits / 8]`` with two 4-bit codes per byte, low nibble first; ``scales`` is
``[N * n_blocks]``; ``zero_points`` is packed like ``B`` (uint8) or, for HQQ's float zeros, a float
``[N * n_blocks]``; without ``zero_points`` the kernel assumes ``2 ** (bits - 1)`` (symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Blocked:
    """Codes ``q`` (``[N, K_padded]``), per-block ``scale`` and ``zero`` (``[N, n_blocks]``)."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray  # integer-valued, except for HQQ's float zero points
    bits: int
    block_size: int
    k: int  # the real input dimension; q is zero-padded up to a multiple of block_size
    symmetric: bool

    @property
    def float_zero(self) -> bool:
        return bool(np.any(self.zero != np.round(self.zero)))

    def dequantize(self) -> np.ndarray:
        """Back to a float ``[K, N]`` MatMul weight."""
        return np.ascontiguousarray(self.rows(0, self.q.shape[0]).T)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Output rows ``start:stop`` dequantized: float32 ``[stop - start, K]`` (a ``[out, in]`` slice)."""
        scale = np.repeat(self.scale[start:stop], self.block_size, axis=1)
        zero = np.repeat(self.zero[start:stop], self.block_size, axis=1)
        w = (self.q[start:stop].astype(np.float32) - zero) * scale
        return w[:, : self.k].astype(np.float32)


def _pad(wt: np.ndarray, block_size: int) -> np.ndarray:
    pad = (-wt.shape[1]) % block_size
    return np.pad(wt, ((0, 0), (0, pad))) if pad else wt


CLIP_GRID = np.linspace(1.0, 0.75, 11)  # range shrink factors tried by clip search (1.0 = plain min/max)


def block_params(
    groups: np.ndarray, bits: int, symmetric: bool, clip: bool = False, float_min: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point per row of ``groups`` (``[..., block_size]``), RTN style.

    ``float_min`` (asymmetric only): the block's minimum is kept as it is, a float (GGUF's Q4_1, and
    slimline's MatMulQ4), instead of being rounded onto the code grid as an integer zero point; the
    scale and the minimum are rounded to float16 first, as MatMulQ4 stores them, so the codes are
    chosen against the values the kernel reads. The zero point returned is then -minimum / scale.
    Weights that were Q4_1 blocks of this size come back exactly. Each block also tries the grid its
    values already lie on, if any (``_lattice``: GGUF's K-quants fit each block's scale and minimum by
    least squares, so their codes needn't span 0..15 and min/max misses the grid), and at 8 bits
    (MatMulQ8) the symmetric grid (zero point 128, scale max|w| / 127: GGUF's Q8_0, whose blocks then
    come back exactly) and that lattice centred on zero (GGUF's Q5_0 and Q4_0 blocks, w = d * integer,
    come back exactly in 8 bits); whichever rounds with the least squared error is kept.

    Symmetric uses codes ``1 .. 2**bits - 1`` around ``2**(bits-1)`` so that no weight is clipped and
    every rounding error stays within half a scale. With ``clip``, each block's range is also shrunk by
    the factors in ``CLIP_GRID`` and the one with the least squared rounding error kept: clipping a
    rare outlier can buy a finer step for the rest. The factor 1.0 is among them, so a block never
    ends up with more error than without the search.
    """
    shrinks = CLIP_GRID if clip else (1.0,)
    candidates = [_range_params(groups, bits, symmetric, f, float_min) for f in shrinks]
    if float_min and not symmetric:
        step, zero = _lattice(groups, bits)
        candidates.append((step, zero))
        if bits == 8:
            candidates += [_range_params(groups, bits, True, f, float_min) for f in shrinks]
            # the lattice centred on zero: a symmetric source (Q4_0, Q5_0, Q8_0: w = d * integer) fits
            # 8-bit codes around 128 exactly, its minimum -128 * d exact in float16 too
            candidates.append((step, np.full(step.shape, 128.0, np.float32)))
    if len(candidates) == 1:
        return candidates[0]
    best_err = best = None
    for scale, zero in candidates:
        deq = (_codes(groups, scale[..., None], zero[..., None], bits) - zero[..., None]) * scale[..., None]
        err = np.square(groups - deq).sum(axis=-1)
        if best is None:
            best_err, best = err, (scale, zero)
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = (np.where(better, scale, best[0]), np.where(better, zero, best[1]))
    return best


def _lattice(groups: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid a block's values already lie on, when they came from a quantized checkpoint: the smallest
    gap between distinct values as the scale, the smallest value as the minimum (float16, as stored).
    Values that lie on no such grid of 2**bits codes get a grid that rounds badly, and ``block_params``
    keeps another."""
    v = np.sort(groups, axis=-1)
    gaps = np.diff(v, axis=-1)
    spread = v[..., -1] - v[..., 0]
    gaps = np.where(gaps > 1e-5 * spread[..., None], gaps, np.inf)
    step = gaps.min(axis=-1)
    scale = np.asarray(np.where(np.isfinite(step), step, 1.0), np.float16).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0))
    zero = -np.asarray(v[..., 0], np.float16).astype(np.float32) / scale
    return scale.astype(np.float32), zero.astype(np.float32)


def _range_params(
    groups: np.ndarray, bits: int, symmetric: bool, shrink: float, float_min: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = shrink * np.abs(groups).max(axis=-1) / (half - 1)
        if float_min:  # the scale as float16 stores it (the minimum -half * scale is then exact too)
            scale = np.asarray(scale, np.float16).astype(np.float32)
        zero = np.full(scale.shape, float(half))
    else:
        lo, hi = shrink * groups.min(axis=-1), shrink * groups.max(axis=-1)
        scale = (hi - lo) / qmax
        if float_min:
            scale = np.asarray(scale, np.float16).astype(np.float32)
            scale = np.where(scale > 0, scale, np.float32(1.0))
            zero = -np.asarray(lo, np.float16).astype(np.float32) / scale
            return scale.astype(np.float32), zero.astype(np.float32)
        zero = np.clip(np.round(-lo / np.where(scale > 0, scale, 1)), 0, qmax)
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero block: any scale reproduces it
    return scale.astype(np.float32), zero.astype(np.float32)


def _codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(w / scale + zero), 0, 2**bits - 1)


def rtn(
    weight: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False, clip: bool = False, float_min: bool = False
) -> Blocked:
    """Round-to-nearest group-wise quantization of a ``[K, N]`` weight (``float_min``: see ``block_params``)."""
    k, n = weight.shape
    wt = _pad(weight.T.astype(np.float32), block_size)
    groups = wt.reshape(n, -1, block_size)
    scale, zero = block_params(groups, bits, symmetric, clip, float_min)
    q = _codes(groups, scale[..., None], zero[..., None], bits).reshape(n, -1)
    return Blocked(q.astype(np.uint8), scale, zero, bits, block_size, k, symmetric)


def hqq(
    weight: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> Blocked:
    """HQQ: RTN's scale, and a float zero point per block fitted by half-quadratic splitting.

    Iterates ``W_e = shrink_p(W - deq(q))`` (the sparse outlier part of the error) and the closed-form
    zero ``mean(q - (W - W_e) / s)``, keeping the best (mean abs error) iterate.
    """
    k, n = weight.shape
    wt = _pad(weight.T.astype(np.float32), block_size)
    w = wt.reshape(n, -1, block_size)
    scale, zero = block_params(w, bits, symmetric=False)
    s, z = scale[..., None], zero[..., None].astype(np.float32)
    best_err, best_z = np.inf, z
    for _ in range(iters):
        q = _codes(w, s, z, bits)
        r = (q - z) * s
        err = float(np.abs(w - r).mean())
        if err >= best_err:
            break
        best_err, best_z = err, z
        e = w - r
        shrunk = np.sign(e) * np.maximum(np.abs(e) - np.power(np.abs(e) + 1e-8, lp_norm - 1) / beta, 0)
        z = np.mean(q - (w - shrunk) / s, axis=-1, keepdims=True).astype(np.float32)
        beta *= kappa
    q = _codes(w, s, best_z, bits).reshape(n, -1)
    return Blocked(q.astype(np.uint8), scale, best_z[..., 0], bits, block_size, k, symmetric=False)


# GPTQ's Hessian, its factorizations and the weight being updated are float64 up to this many input
# features (SmolLM2's 1536: 18 MB a matrix), float32 beyond (a 3B model's down_proj, 8192: 0.5 GB a
# matrix in float64, two at once), where the memory matters more than the last bits of rounding.
F64_MAX_K = 4096


def gptq(
    weight: np.ndarray,
    hessian: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = True,
    chunk: int = 128,
    clip: bool = False,
    float_min: bool = False,
) -> Blocked:
    """GPTQ of a ``[K, N]`` weight given the ``[K, K]`` Hessian ``X^T X`` of its calibration inputs.

    ``damp`` adds that fraction of the mean diagonal to the Hessian (numerical stability and a
    prior towards RTN). With ``act_order`` the columns are processed in order of decreasing Hessian
    diagonal (largest activations first); the block scales are then fixed up front from the original
    weights ("static groups") so that the stored layout stays plain MatMulNBits blocks, with no g_idx.
    """
    import torch

    k, n = weight.shape
    kp = k + (-k) % block_size
    dtype = torch.float64 if kp <= F64_MAX_K else torch.float32
    w = torch.from_numpy(_pad(weight.T.astype(np.float32), block_size)).to(dtype)  # [N, Kp]
    h = torch.zeros(kp, kp, dtype=dtype)
    h[:k, :k] = torch.from_numpy(hessian)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    n_blocks = kp // block_size
    scale = np.zeros((n, n_blocks), np.float32)
    zero = np.zeros((n, n_blocks), np.float32)
    static = act_order
    if static:
        scale[:], zero[:] = block_params(w.numpy().reshape(n, n_blocks, block_size), bits, symmetric, clip, float_min)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(kp)
    w = w[:, perm]
    # At most two K x K matrices live at once: the permutation, the damping and the factorizations each
    # replace the one before. Past F64_MAX_K they are float32, as in the reference GPTQ (an 8B model's
    # down_proj, K = 14336: 0.8 GB each instead of 1.6).
    h = h.index_select(0, perm)
    h = h.index_select(1, perm)
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    try:
        h = torch.linalg.cholesky(h)
        h = torch.cholesky_inverse(h)
        hinv = torch.linalg.cholesky(h, upper=True)
    except RuntimeError as e:  # not positive definite even after damping
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite ({e}); raise `damp`.") from e
    del h
    q = torch.zeros(w.shape, dtype=torch.uint8)
    chunk = max(chunk // block_size, 1) * block_size  # a block never straddles two chunks
    qmax = 2**bits - 1
    for i1 in range(0, kp, chunk):
        i2 = min(i1 + chunk, kp)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // block_size
            if not static and col % block_size == 0:  # first column of its block: fit the block now
                scale[:, g], zero[:, g] = block_params(w1[:, i : i + block_size].numpy(), bits, symmetric, clip, float_min)
            s = torch.from_numpy(scale[:, g]).to(dtype)
            z = torch.from_numpy(zero[:, g]).to(dtype)
            codes = torch.clamp(torch.round(w1[:, i] / s + z), 0, qmax)
            q[:, i1 + i] = codes.to(torch.uint8)
            e = (w1[:, i] - (codes - z) * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return Blocked(q.numpy(), scale, zero, bits, block_size, k, symmetric)


# -- packing into MatMulNBits and MatMulQ4/Q8 ------------------------------------------------------


def pack_q(b: Blocked) -> dict[str, np.ndarray]:
    """The ``B``, ``scales`` and ``mins`` initializers of slimline's MatMulQ4 / MatMulQ8 (4 or 8 bits, blocks
    of 32, a K that is a multiple of 32): the minimum of each block is -zero * scale, both in float16."""
    from slimline.ops import q4

    if not q4.fits(b.bits, b.block_size, b.k):
        raise ValueError(
            f"MatMulQ4/Q8 hold 4- or 8-bit weights in blocks of 32 along a K divisible by 32, not {b.bits}-bit/{b.block_size}/K={b.k}"
        )
    mins = (-b.zero * b.scale).astype(np.float16)
    data, scales, low = q4.pack(b.q, b.scale.astype(np.float16), mins, b.bits)
    return {"B": data, "scales": scales, "mins": low}


def pack_for(b: Blocked, slimline: bool) -> dict[str, np.ndarray]:
    """MatMulQ4/Q8's initializers (``slimline``) or MatMulNBits'."""
    return pack_q(b) if slimline else pack(b)


def pack(b: Blocked) -> dict[str, np.ndarray]:
    """The ``B``, ``scales`` and (unless symmetric) ``zero_points`` initializers of MatMulNBits."""
    n, kp = b.q.shape
    n_blocks = kp // b.block_size
    if b.bits == 4:
        pairs = b.q.reshape(n, n_blocks, b.block_size // 2, 2)
        data = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    else:
        data = b.q.reshape(n, n_blocks, b.block_size).astype(np.uint8)
    out = {"B": data, "scales": b.scale.astype(np.float32)}  # [N, n_blocks]; MatMulNBits takes 1-D or 2-D
    if b.symmetric:
        return out
    if b.float_zero:
        out["zero_points"] = b.zero.astype(np.float32)
    elif b.bits == 4:
        z = b.zero.astype(np.uint8)
        if n_blocks % 2:
            z = np.pad(z, ((0, 0), (0, 1)))
        out["zero_points"] = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    else:
        out["zero_points"] = b.zero.astype(np.uint8)
    return out
