"""``quantize.fp16``: half-precision weights and compute for GPU targets, with fp32 islands.

The converter is ONNX Runtime's transformers ``OnnxModel.convert_float_to_float16``, which knows
the contrib ops' type constraints (the generic ``float16.convert_float_to_float16`` breaks the fused
Attention node). Normalisations and Softmax stay fp32 by default (``keep_float``): their reductions
overflow or lose the small differences that matter in fp16. Graph inputs and outputs stay fp32
(``keep_io_types``) so that callers and the evaluator need no change.

bf16 is not offered: ONNX Runtime's CPU and CUDA EPs lack bf16 kernels for most contrib ops.
On the CPU EP most fp16 ops run through casts and are slower than fp32; the error is still measured
here, and the ``ort-cuda`` target is where the speed is.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import Field

from slimline.artifact import OnnxModel
from slimline.quantize.common import fidelity_guard, refuse_quantized
from slimline.stage import Context, Stage, StageResult

UNSTABLE_OPS = [
    "LayerNormalization",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
]


class Fp16(Stage):
    """fp16 weights and compute with fp32 islands for unstable ops; reports the output error."""

    kind = "quantize.fp16"
    consumes = (OnnxModel,)

    keep_float: list[str] = Field(UNSTABLE_OPS, description="op types kept in fp32")
    min_cosine: float = Field(0.99, ge=0, le=1, description="fail if calibration outputs fall below this cosine")

    def run(self, artifact: OnnxModel, ctx: Context) -> StageResult:
        import onnx
        from onnxruntime.transformers.onnx_model import OnnxModel as OrtModel

        from slimline.runtime import quiet

        model = onnx.load(str(artifact.path))
        refuse_quantized(model, self.kind)
        ort_model = OrtModel(model)
        with quiet():
            ort_model.convert_float_to_float16(keep_io_types=True, op_block_list=list(self.keep_float))
        out = ctx.stage_dir("quantize_fp16") / "model.onnx"
        onnx.save_model(ort_model.model, str(out))
        counts = Counter(n.op_type for n in ort_model.model.graph.node)
        fp16 = sum(1 for t in ort_model.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
        kept = sorted(op for op in self.keep_float if counts.get(op))
        report: dict[str, Any] = {
            "fp16_initializers": fp16,
            "casts_inserted": counts["Cast"] - Counter(n.op_type for n in model.graph.node)["Cast"],
            "fp32_islands": ", ".join(f"{op} x{counts[op]}" for op in kept) or "none",
        }
        fidelity_guard(self, artifact, out, ctx, report, [], hint="Keep more op types in fp32 with `keep_float`.")
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, artifact.config), report)
