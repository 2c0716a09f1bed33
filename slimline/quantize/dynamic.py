"""``quantize.dynamic_int8``: int8 weights, activations quantized on the fly per batch.

The quantizer is ONNX Runtime's ``quantize_dynamic``: on a fused graph it produces QAttention,
QEmbedLayerNormalization and MatMulInteger, which run u8s8 integer GEMMs on the CPU EP. What we add:
- ``DefaultTensorType`` is always passed, so the fused graph (whose contrib-op outputs carry no type
  information) quantizes instead of failing with "Unable to find data type for weight_name".
- exclusions by layer-name pattern, with a warning for a pattern that matches nothing;
- the error it caused: SQNR of every quantized weight (worst first) and the cosine of the model's
  outputs against the float graph on calibration text; below ``min_cosine`` the stage fails.
"""

from __future__ import annotations

import fnmatch
from collections import Counter

from pydantic import Field

from slimline.artifact import OnnxModel
from slimline.errors import StageError
from slimline.quantize.error import consumers, output_fidelity, weight_sqnr
from slimline.runtime import quiet
from slimline.stage import Context, Stage, StageResult

QUANTIZED_OPS = {
    "MatMulInteger",
    "QAttention",
    "QEmbedLayerNormalization",
    "DynamicQuantizeLinear",
    "QLinearMatMul",
    "MatMulNBits",
    "DequantizeLinear",
}
FLOAT_OPS = ("MatMul", "Attention", "EmbedLayerNormalization", "Gemm")


class DynamicInt8(Stage):
    """Dynamic int8 quantization with ONNX Runtime, reporting per-layer and output error."""

    kind = "quantize.dynamic_int8"
    consumes = (OnnxModel,)

    per_channel: bool = Field(True, description="one scale per output channel (more accurate than per-tensor)")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs whose int8 GEMM saturates")
    op_types: list[str] | None = Field(None, description="op types to quantize; default: all ORT supports")
    exclude: list[str] = Field(default_factory=list, description="node-name glob patterns kept in float")
    min_cosine: float = Field(0.9, ge=0, le=1, description="fail if calibration outputs fall below this cosine")

    def run(self, artifact: OnnxModel, ctx: Context) -> StageResult:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        model = onnx.load(str(artifact.path))
        already = sorted({n.op_type for n in model.graph.node} & QUANTIZED_OPS)
        if already:
            raise StageError(
                f"quantize.dynamic_int8: the model is already quantized (it has {', '.join(already)} nodes). "
                "Quantize the float model once: remove the earlier quantize stage or start from a float export."
            )
        names = [n.name for n in model.graph.node if n.name]
        excluded = sorted({n for pattern in self.exclude for n in names if fnmatch.fnmatchcase(n, pattern)})
        for pattern in self.exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                ctx.warn(f"quantize.dynamic_int8: exclude pattern `{pattern}` matches no node; nothing was kept in float for it.")

        out = ctx.stage_dir("quantize_dynamic_int8") / "model.onnx"
        with quiet():  # ORT logs a generic "consider pre-processing" hint on the root logger
            quantize_dynamic(
                str(artifact.path),
                str(out),
                per_channel=self.per_channel,
                reduce_range=self.reduce_range,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=self.op_types,
                nodes_to_exclude=excluded,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        quantized = onnx.load(str(out))
        counts = Counter(n.op_type for n in quantized.graph.node)
        report: dict = {f"quantized.{op}": counts[op] for op in sorted(QUANTIZED_OPS) if counts.get(op)}
        report.update({f"float.{op}": counts[op] for op in FLOAT_OPS if counts.get(op)})
        report["excluded_nodes"] = len(excluded)
        if excluded:
            report["excluded"] = ", ".join(excluded)
        if not any(counts.get(op) for op in ("MatMulInteger", "QAttention", "QLinearMatMul")):
            raise StageError(
                "quantize.dynamic_int8: no layer was quantized (no MatMul/Attention left after `exclude` and "
                "`op_types`). Check those options; a float model passed through is not an int8 model."
            )

        sqnr = weight_sqnr(model, quantized)
        layer_of = consumers(model)
        worst = sorted(sqnr.items(), key=lambda kv: kv[1])
        report["weights_quantized"] = len(sqnr)
        if worst:
            report["weight_sqnr_db.min"] = round(worst[0][1], 2)
            report["weight_sqnr_db.median"] = round(sorted(sqnr.values())[len(sqnr) // 2], 2)
            for name, db in worst[:5]:
                report[f"weight_sqnr_db.worst.{layer_of.get(name, name)}/{name}"] = round(db, 2)

        texts = ctx.data.calibration[:64] if ctx.load_data else []
        if texts:
            fid = output_fidelity(
                artifact.path, out, artifact.tokenizer, texts, artifact.info.task, artifact.info.pooling, ctx.threads
            )
            report.update(fid)
            if fid["calibration.mean_cosine"] < self.min_cosine:
                worst_names = ", ".join(layer_of.get(n, n) for n, _ in worst[:3])
                raise StageError(
                    f"quantize.dynamic_int8: outputs on calibration text fell to mean cosine "
                    f"{fid['calibration.mean_cosine']:.3f} (< min_cosine={self.min_cosine}). Lowest-SQNR layers: "
                    f"{worst_names}. Add them to `exclude`, or set per_channel: true."
                )
        else:
            ctx.warn("quantize.dynamic_int8: no calibration text, so the output error was not measured.")
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, artifact.config), report)
