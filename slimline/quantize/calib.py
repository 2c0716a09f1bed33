"""Calibration activations of an ONNX graph, and the per-layer output error a quantizer causes.

The feeds (``calibration_feeds``) and the error figures (``relative_error``, ``to_db``) come from the
measurement floor (``slimline.measure``); this module runs the float graph and collects rows.

Every quantizer reports, for each layer it touched, how far that layer's *output* moved on real
calibration inputs: ``rel_error = ||X W - Q(X, W)||_F / ||X W||_F`` with ``X`` the layer's float
input captured from the float graph (padding tokens dropped), and the same figure in dB
(``sqnr_db = -20 log10(rel_error)``). Isolating each layer (float inputs, only its own weights
quantized) is what makes the figure point at a layer; the end-to-end cosine is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimline.measure.metrics import to_db


@dataclass
class Captured:
    """One tensor's calibration rows: a sample for error measurement, the Gram matrix for GPTQ."""

    rows: list[np.ndarray] = field(default_factory=list)
    gram: np.ndarray | None = None
    count: int = 0
    absmax: np.ndarray | None = None  # per-channel max |x| (SmoothQuant)

    @property
    def sample(self) -> np.ndarray:
        return np.concatenate(self.rows) if self.rows else np.zeros((0, 0), np.float32)


def with_outputs(model: Any, names: list[str]) -> Any:
    """A copy of ``model`` whose graph also outputs the intermediate tensors ``names``."""
    import copy

    from onnx import TensorProto, helper

    m = copy.deepcopy(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return m


def capture(
    model: Any,
    tensors: list[str],
    feeds: list[dict],
    *,
    max_rows: int = 1024,
    gram: set[str] | frozenset = frozenset(),
    threads: int = 0,
    workdir: Path | None = None,
) -> dict[str, Captured]:
    """Run the float graph on ``feeds`` and collect the rows (tokens) of each tensor in ``tensors``.

    Rows of padding tokens are dropped. Up to ``max_rows`` rows per tensor are kept, spread over the
    batches; for the tensors in ``gram`` the full ``X^T X`` (float64) is accumulated over every row.
    """
    import onnx

    from slimline.runtime import ort_session

    extended = with_outputs(model, tensors)
    path = Path(workdir or ".") / "capture.onnx"
    onnx.save_model(extended, str(path))
    session = ort_session(path, threads)
    inputs = {i.name for i in session.get_inputs()}
    out: dict[str, Captured] = {t: Captured() for t in tensors}
    per_batch = max(1, max_rows // max(len(feeds), 1))
    rng = np.random.default_rng(0)
    try:
        for feed in feeds:
            values = session.run(tensors, {k: v for k, v in feed.items() if k in inputs})
            mask = feed.get("attention_mask")
            for name, value in zip(tensors, values, strict=True):
                x = np.asarray(value, dtype=np.float32)
                if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                    x = x[mask.astype(bool)]
                else:
                    x = x.reshape(-1, x.shape[-1])
                c = out[name]
                c.count += len(x)
                amax = np.abs(x).max(axis=0)
                c.absmax = amax if c.absmax is None else np.maximum(c.absmax, amax)
                take = x if len(x) <= per_batch else x[rng.choice(len(x), per_batch, replace=False)]
                c.rows.append(take)
                if name in gram:
                    xd = x.astype(np.float64)
                    c.gram = xd.T @ xd if c.gram is None else c.gram + xd.T @ xd
    finally:
        path.unlink(missing_ok=True)
    return out


def layer_report(errors: dict[str, float], report: dict, top: int = 5) -> None:
    """Add the per-layer output errors to a stage report: summary figures and the worst layers first."""
    if not errors:
        return
    ranked = sorted(errors.items(), key=lambda kv: -kv[1])
    report["layer_error.max"] = round(ranked[0][1], 5)
    report["layer_error.median"] = round(ranked[len(ranked) // 2][1], 5)
    report["layer_sqnr_db.min"] = round(to_db(ranked[0][1]), 2)
    for name, rel in ranked[:top]:
        report[f"layer_error.worst.{name}"] = round(rel, 5)
    report["layer_errors"] = {name: round(rel, 6) for name, rel in ranked}
