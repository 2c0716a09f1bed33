"""``quantize.static_int8``: QDQ int8 with activation ranges calibrated on the recipe's data.

The quantizer is ONNX Runtime's ``quantize_static`` (QDQ format; CPU and CUDA EPs fuse each
DequantizeLinear -> MatMul -> QuantizeLinear group into an integer GEMM). What makes it accurate by
default, where a plain MinMax run over every op wrecked all-MiniLM-L6-v2 (mean cosine 0.33, measured
by an earlier session against ORT's own quantize_static defaults):
- only MatMul/Gemm with a constant weight are quantized (``MatMulConstBOnly``); Softmax, LayerNorm,
  GELU, the attention-score MatMuls and the attention-mask arithmetic stay float (``op_types``
  overrides the selection);
- per-channel weights; MinMax calibration by default, Entropy or Percentile (``percentile``, 99.999th
  by default) where outlier tokens stretch a MinMax range;
- the per-layer output error with the calibrated activation scale, and ``fallback: auto``.

Fused or not: the fused Attention op has no QDQ form, so on a fused graph its QKV projection stays
float while the output projection and FFN MatMuls become int8. docs/quantize.md measures both orders.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from slimline.artifact import OnnxModel
from slimline.errors import StageError
from slimline.measure.inputs import calibration_feeds, check_texts
from slimline.measure.metrics import relative_error
from slimline.measure.quantsim import resolve_reduce_range
from slimline.quantize import calib
from slimline.quantize.common import (
    FileQuantizer,
    reduce_range_note,
    weight_of,
    weighted_layers,
)
from slimline.quantize.error import dequantized_weights, weight_sqnr
from slimline.runtime import quiet
from slimline.stage import Context


def with_types(model: Any) -> Any:
    """The model with every tensor's type inferred, contrib ops included.

    The calibrator only measures tensors whose type it knows; fused contrib ops (Attention,
    SkipLayerNormalization, BiasGelu) have no ONNX type inference, so without this step the fused
    graph's activations would silently stay float and only the weights would be quantized.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - an op it can't infer: quantize what plain ONNX types cover
        return model


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def activation_quant(quantized: Any) -> dict[str, tuple[float, float, int, int]]:
    """Weighted MatMul node name -> (scale, zero point, qmin, qmax) of the QDQ pair on its input 0."""
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    producer = {o: n for n in quantized.graph.node for o in n.output}
    out = {}
    for node in quantized.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        dq, wdq = producer.get(node.input[0]), producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in init:
            continue
        if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in init:
            continue  # an activation x activation MatMul, not a weighted layer
        zp = init.get(dq.input[2]) if len(dq.input) > 2 else None
        info = np.iinfo(zp.dtype) if zp is not None else np.iinfo(np.int8)
        out[node.name] = (float(init[dq.input[1]]), float(zp) if zp is not None else 0.0, info.min, info.max)
    return out


class StaticInt8(FileQuantizer):
    """QDQ static int8 with calibrated activation ranges, reporting per-layer and output error."""

    kind = "quantize.static_int8"
    consumes = (OnnxModel,)
    workdir = "quantize_static_int8"

    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = Field("MinMax", description="how activation ranges are set")
    percentile: float = Field(99.999, gt=90, le=100, description="Percentile calibration: the range's percentile of |x|")
    scheme: Literal["U8S8", "S8S8"] = Field("U8S8", description="activation/weight types: U8S8 for x86 CPUs, S8S8 for GPUs")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    reduce_range: bool | Literal["auto"] = Field(
        "auto",
        description="7-bit weights, for CPUs without VNNI whose int8 GEMM saturates; auto: on when this CPU has no VNNI",
    )
    op_types: list[str] = Field(["MatMul", "Gemm"], description="op types to quantize (constant-weight ones only)")

    def _quantize_static(self, src: Path, dst: Path, feeds: list[dict], exclude: set[str]) -> None:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        act = QuantType.QUInt8 if self.scheme == "U8S8" else QuantType.QInt8
        typed = dst.with_name("typed.onnx")
        onnx.save_model(with_types(onnx.load(str(src))), str(typed))
        extra = {
            "MatMulConstBOnly": True,
            "OpTypesToExcludeOutputQuantization": list(self.op_types),
            "CalibPercentile": self.percentile,
            "DefaultTensorType": onnx.TensorProto.FLOAT,
        }
        with quiet():
            quantize_static(
                str(typed),
                str(dst),
                _Reader(feeds),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=self.op_types,
                per_channel=self.per_channel,
                reduce_range=resolve_reduce_range(self.reduce_range),
                activation_type=act,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=sorted(exclude),
                calibrate_method=getattr(CalibrationMethod, self.calibrate_method),
                extra_options=extra,
            )
        typed.unlink()

    def prepare(self, model: Any, artifact: OnnxModel, ctx: Context) -> list[dict]:
        """The calibration feeds that set the activation ranges."""
        if not ctx.load_data:
            raise StageError(f"{self.kind}: static quantization calibrates activation ranges and needs data; the run has none.")
        texts = check_texts(ctx.data.calibration[: self.calibration_texts], self.kind)
        inputs = [i.name for i in model.graph.input]
        return calibration_feeds(artifact.tokenizer, texts, inputs, fixed=self.calibrate_method != "MinMax")

    def always_float(self, model: Any, prepared: Any) -> set[str]:
        # ONNX Runtime's MatMulConstBOnly is ignored in QDQ mode: keep the attention-score MatMuls
        # (activation x activation, next to the softmax and the mask) in float by name.
        scores = {n.name for n in model.graph.node if n.op_type in self.op_types and weight_of(model, n) is None}
        return scores | super().always_float(model, prepared)

    def timing_quantizer(self) -> Any:
        return lambda src, dst: self.quantize_file(src, dst, self._timing_feeds(src), set())

    def quantize_file(self, src: Path, dst: Path, feeds: list[dict], exclude: set[str]) -> None:
        try:
            self._quantize_static(src, dst, feeds, exclude)
        except (ValueError, RuntimeError) as e:  # ORT's calibrator on a shape it can't handle
            raise StageError(f"{self.kind}: ONNX Runtime's static quantizer failed: {e}") from e

    def describe(self, model: Any, quantized: Any, excluded: set[str], floats: set[str], report: dict) -> None:
        counts = Counter(n.op_type for n in quantized.graph.node)
        quantized_layers = len(activation_quant(quantized))
        if not quantized_layers:
            raise StageError(
                f"{self.kind}: no layer was quantized (no {'/'.join(self.op_types)} with a constant weight left after "
                "`exclude` and fallback). A float model passed through is not an int8 model."
            )
        report.update(
            {
                "calibrate_method": self.calibrate_method,
                "scheme": self.scheme,
                "reduce_range": reduce_range_note(self.reduce_range),
                "quantized_layers": quantized_layers,
                "QuantizeLinear": counts["QuantizeLinear"],
                "DequantizeLinear": counts["DequantizeLinear"],
            }
        )
        report.update({f"float.{op}": counts[op] for op in ("Attention", "EmbedLayerNormalization", "Softmax") if counts.get(op)})
        report["excluded_nodes"] = len(excluded)
        report["float.activation_matmuls"] = len(self.always_float(model, None))
        sqnr = weight_sqnr(model, quantized)
        if sqnr:
            report["weight_sqnr_db.min"] = round(min(sqnr.values()), 2)

    def layer_errors(self, model: Any, quantized: Any, artifact: OnnxModel, feeds: list[dict], ctx: Context) -> tuple[dict, dict]:
        """Each layer's output error with its calibrated activation scale and int8 weight."""
        layers = weighted_layers(model, self.op_types)
        deq = dequantized_weights(model, quantized)
        acts = activation_quant(quantized)
        layers = {n: v for n, v in layers.items() if n in acts and v[1] in deq}
        if not layers:
            return {}, {}
        x_all = calib.capture(
            model, sorted({a for a, _, _ in layers.values()}), feeds, threads=ctx.threads, workdir=ctx.stage_dir("calibration")
        )
        errors = {}
        for name, (act, wname, w) in layers.items():
            x = x_all[act].sample
            scale, zero, lo, hi = acts[name]
            xq = (np.clip(np.round(x / scale) + zero, lo, hi) - zero) * scale
            errors[name] = relative_error(x @ w, xq.astype(np.float32) @ deq[wname].astype(np.float32))
        return errors, {name: layers[name][2].shape for name in errors}

    @staticmethod
    def _timing_feeds(src: Path) -> list[dict]:
        """Calibration feeds for a one-MatMul timing model (its input X)."""
        import onnx

        k = onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim[1].dim_value
        return [{"X": np.random.default_rng(0).standard_normal((64, k)).astype(np.float32)}]
