"""What ONNX Runtime's quantizers wrote: each weight's dequantized value and its SQNR against the float one.

The end-to-end output cosine is the model family's ``output_fidelity`` (``slimline.family``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slimline.measure.metrics import sqnr_db


def _broadcast(param: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Reshape a per-channel scale/zero point so it broadcasts along the axis of matching length."""
    if param.size == 1:
        return param.reshape(())
    for axis in range(like.ndim - 1, -1, -1):
        if like.shape[axis] == param.size:
            shape = [1] * like.ndim
            shape[axis] = param.size
            return param.reshape(shape)
    raise ValueError(f"scale of size {param.size} does not match weight shape {like.shape}")


def dequantized_weights(original: Any, quantized: Any) -> dict[str, np.ndarray]:
    """Float weight name -> its dequantized value, for weights ORT stored as ``<w>_quantized`` + scale/zero point."""
    from onnx import numpy_helper

    floats = {t.name: t for t in original.graph.initializer}
    q_inits = {t.name: t for t in quantized.graph.initializer}
    out = {}
    for name, tensor in q_inits.items():
        if not name.endswith("_quantized"):
            continue
        base = name[: -len("_quantized")]
        if base not in floats or f"{base}_scale" not in q_inits:
            continue
        q = numpy_helper.to_array(tensor).astype(np.float64)
        scale = numpy_helper.to_array(q_inits[f"{base}_scale"]).astype(np.float64)
        zp_t = q_inits.get(f"{base}_zero_point")
        zp = numpy_helper.to_array(zp_t).astype(np.float64) if zp_t is not None else np.zeros_like(scale)
        if tuple(floats[base].dims) != q.shape:
            continue
        try:
            out[base] = (q - _broadcast(zp, q)) * _broadcast(scale, q)
        except ValueError:
            continue
    return out


def weight_sqnr(original: Any, quantized: Any) -> dict[str, float]:
    """SQNR per quantized weight: ORT names them ``<w>_quantized`` beside ``<w>_scale``/``<w>_zero_point``."""
    from onnx import numpy_helper

    floats = {t.name: t for t in original.graph.initializer}
    return {
        name: sqnr_db(numpy_helper.to_array(floats[name]), deq) for name, deq in dequantized_weights(original, quantized).items()
    }


def consumers(model: Any) -> dict[str, str]:
    """initializer name -> name of the node that reads it (for naming layers in reports)."""
    names = {}
    for node in model.graph.node:
        for inp in node.input:
            names.setdefault(inp, node.name or node.op_type)
    return names
