"""``quantize.dynamic_int8``: int8 weights, activations quantized on the fly per batch.

The quantizer is ONNX Runtime's ``quantize_dynamic``: on a fused graph it produces QAttention,
QEmbedLayerNormalization and MatMulInteger, which run u8s8 integer GEMMs on the CPU EP. What we add:
- ``DefaultTensorType`` is always passed, so the fused graph (whose contrib-op outputs carry no type
  information) quantizes instead of failing with "Unable to find data type for weight_name".
- exclusions by layer-name pattern, with a warning for a pattern that matches nothing;
- the error it caused: SQNR of every quantized weight, each layer's output error on calibration
  inputs (int8 weights and the per-tensor uint8 activation quantization the kernel does), and the
  cosine of the model's outputs against the float graph; below ``min_cosine`` the stage fails;
- ``fallback: auto`` (see ``common``), which re-quantizes with the offending layers kept in float.
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
from slimline.measure.quantsim import resolve_reduce_range, uint8_roundtrip
from slimline.quantize import calib
from slimline.quantize.common import (
    QUANTIZED_OPS,
    FileQuantizer,
    reduce_range_note,
    weighted_layers,
)
from slimline.quantize.error import consumers, dequantized_weights, weight_sqnr
from slimline.runtime import quiet
from slimline.stage import Context

FLOAT_OPS = ("MatMul", "Attention", "EmbedLayerNormalization", "Gemm")
WEIGHTED_OPS = ("MatMul", "Attention")  # layers whose input 1 is a [K, N] weight


class DynamicInt8(FileQuantizer):
    """Dynamic int8 quantization with ONNX Runtime, reporting per-layer and output error."""

    kind = "quantize.dynamic_int8"
    consumes = (OnnxModel,)
    workdir = "quantize_dynamic_int8"

    per_channel: bool = Field(True, description="one scale per output channel (more accurate than per-tensor)")
    reduce_range: bool | Literal["auto"] = Field(
        "auto",
        description="7-bit weights, for CPUs without VNNI whose int8 GEMM saturates; auto: on when this CPU has no VNNI",
    )
    op_types: list[str] | None = Field(None, description="op types to quantize; default: all ORT supports")

    def quantize_file(self, src: Path, dst: Path, prepared: Any, exclude: set[str]) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with quiet():  # ORT logs a generic "consider pre-processing" hint on the root logger
            quantize_dynamic(
                str(src),
                str(dst),
                per_channel=self.per_channel,
                reduce_range=resolve_reduce_range(self.reduce_range),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=self.op_types,
                nodes_to_exclude=sorted(exclude),
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )

    def timing_quantizer(self) -> Any:
        return lambda src, dst: self.quantize_file(src, dst, None, set())

    def describe(self, model: Any, quantized: Any, excluded: set[str], floats: set[str], report: dict) -> None:
        counts = Counter(n.op_type for n in quantized.graph.node)
        report.update({f"quantized.{op}": counts[op] for op in sorted(QUANTIZED_OPS) if counts.get(op)})
        report.update({f"float.{op}": counts[op] for op in FLOAT_OPS if counts.get(op)})
        report["reduce_range"] = reduce_range_note(self.reduce_range)
        report["excluded_nodes"] = len(excluded)
        if excluded:
            report["excluded"] = ", ".join(sorted(excluded))
        if not any(counts.get(op) for op in ("MatMulInteger", "QAttention", "QLinearMatMul")):
            raise StageError(
                f"{self.kind}: no layer was quantized (no MatMul/Attention left after `exclude`, `op_types` and "
                "fallback). Check those options; a float model passed through is not an int8 model."
            )
        sqnr = weight_sqnr(model, quantized)
        report["weights_quantized"] = len(sqnr)
        if sqnr:
            ranked = sorted(sqnr.items(), key=lambda kv: kv[1])
            report["weight_sqnr_db.min"] = round(ranked[0][1], 2)
            report["weight_sqnr_db.median"] = round(ranked[len(ranked) // 2][1], 2)

    def worst_layers(self, model: Any, quantized: Any, errors: dict[str, float]) -> list[str]:
        """By measured output error; without calibration text, by the weights' SQNR."""
        if errors:
            return sorted(errors, key=lambda n: -errors[n])
        layer_of = consumers(model)
        return [layer_of.get(n, n) for n, _ in sorted(weight_sqnr(model, quantized).items(), key=lambda kv: kv[1])]

    def layer_errors(self, model: Any, quantized: Any, artifact: OnnxModel, prepared: Any, ctx: Context) -> tuple[dict, dict]:
        """Each quantized layer's output error on calibration inputs: fake-quantized X times the int8 weight."""
        if not ctx.load_data:
            if self.fallback == "auto":
                raise StageError(f"{self.kind}: fallback: auto needs calibration data; the run has none.")
            return {}, {}
        layers = weighted_layers(model, WEIGHTED_OPS)
        deq = dequantized_weights(model, quantized)
        layers = {name: v for name, v in layers.items() if v[1] in deq}
        if not layers:
            return {}, {}
        texts = check_texts(ctx.data.calibration[: self.calibration_texts], self.kind)
        feeds = calibration_feeds(artifact.tokenizer, texts, [i.name for i in model.graph.input])
        acts = calib.capture(
            model, sorted({a for a, _, _ in layers.values()}), feeds, threads=ctx.threads, workdir=ctx.stage_dir("calibration")
        )
        errors = {}
        for name, (act, wname, w) in layers.items():
            x = acts[act].sample
            errors[name] = relative_error(x @ w, uint8_roundtrip(x) @ deq[wname].astype(np.float32))
        return errors, {name: layers[name][2].shape for name in errors}
