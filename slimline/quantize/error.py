"""How much a quantizer changed a model: per-layer weight SQNR and end-to-end output cosine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; int8 weights are typically 35-45)."""
    noise = float(np.sum((ref.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


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


def output_fidelity(
    ref_path: Path,
    new_path: Path,
    tokenizer: Any,
    texts: list[str],
    task: str,
    pooling: str,
    threads: int = 0,
    config: Any = None,
) -> dict[str, float]:
    """Mean/min cosine of the new graph's task vectors against the reference graph's on ``texts``.

    For a decoder (text-generation) the vectors are each real token's next-token logits, and the
    share of tokens whose top-1 prediction is unchanged is reported too.
    """
    from slimline.models.heads import cosine, cosine_summary, task_vectors
    from slimline.quantize.calib import calibration_feeds
    from slimline.runtime import ort_function

    run_ref, inputs = ort_function(ref_path, threads)
    run_new, _ = ort_function(new_path, threads)
    cos, agree = [], []
    for feeds in calibration_feeds(tokenizer, texts, inputs, config=config):
        a = next(iter(run_ref(feeds).values()))
        b = next(iter(run_new(feeds).values()))
        mask = feeds["attention_mask"]
        if task == "text-generation":
            keep = mask.astype(bool)
            a, b = a[keep], b[keep]
            cos.append(cosine(a, b))
            agree.append(a.argmax(-1) == b.argmax(-1))
        else:
            cos.append(cosine(task_vectors(a, mask, task, pooling), task_vectors(b, mask, task, pooling)))
    out = cosine_summary(np.concatenate(cos) if cos else np.ones(1))
    if agree:
        out["calibration.top1_agreement"] = round(float(np.concatenate(agree).mean()), 5)
    return out
