"""``quantize.fp16``: half-precision weights and compute for GPU targets, with fp32 islands.

The converter is ONNX Runtime's transformers ``OnnxModel.convert_float_to_float16``, which knows
the contrib ops' type constraints (the generic ``float16.convert_float_to_float16`` breaks the fused
Attention node). Normalisations and Softmax stay fp32 by default (``keep_float``): their reductions
overflow or lose the small differences that matter in fp16. Graph inputs and outputs stay fp32
(``keep_io_types``) so that callers and the evaluator need no change.

A decoder's rotary tables (cos/sin of position x inverse frequency, computed in the graph from the
positions) always stay fp32, as transformers computes them: in fp16 a position of 512 has a step of
0.25 and the angle is rounded to it, so SmolLM2's tables would be off by up to 0.16 rad at position
512 and 0.64 at 2,048 where every op runs in fp16 (the CUDA EP). The CPU EP runs part of that chain
in fp32 behind inserted casts, and its tables were still off by 0.047 at 512 and 0.19 at 2,048. Only
the finished tables are cast to fp16 now.

bf16 is not offered: ONNX Runtime's CPU and CUDA EPs lack bf16 kernels for most contrib ops.
On the CPU EP most fp16 ops run through casts and are slower than fp32; the error is still measured
here, and the ``ort-cuda`` target is where the speed is.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from typing import Any

from pydantic import Field

from slimline.artifact import OnnxModel
from slimline.quantize.common import fidelity_guard, refuse_quantized
from slimline.stage import Context, Stage, StageResult

WEIGHT_ONLY_OPS = frozenset({"MatMulNBits", "GatherBlockQuantized"})

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
        # weight-only int4/int8 (MatMulNBits, GatherBlockQuantized) then fp16 activations is the usual GPU
        # build: the kernels take fp16 inputs and scales; int8 activation quantization is refused
        refuse_quantized(model, self.kind, allow=WEIGHT_ONLY_OPS)
        casts_before = sum(1 for n in model.graph.node if n.op_type == "Cast")  # OrtModel edits model in place
        ort_model = OrtModel(model)
        # A decoder's KV cache stays fp16 at the graph's edge: a cast there would hand GroupQueryAttention
        # a fresh copy each step instead of the bound buffers it appends to in place (slimline.generate).
        names = [v.name for v in (*model.graph.input, *model.graph.output)]
        cache = [n for n in names if n.startswith(("past_key_values.", "present."))]
        keep_io: bool | list[str] = [n for n in names if n not in cache] if cache else True
        if cache:
            ort_model.disable_shape_inference()
        tables = rotary_table_nodes(model)
        inputs = [onnx.ValueInfoProto.FromString(i.SerializeToString()) for i in model.graph.input]
        with quiet(), contextlib.redirect_stdout(io.StringIO()):  # ORT prints its shape-inference failures
            # (ORT's symbolic shape inference can't type the decoder's contrib ops; ONNX's own can)
            ort_model.convert_float_to_float16(
                use_symbolic_shape_infer=not cache,
                keep_io_types=keep_io,
                op_block_list=list(self.keep_float),
                node_block_list=tables,
            )
        # the converter drops graph inputs that nothing reads once blocked nodes are in play (a fused
        # decoder's position_ids): callers feed them all the same, so the interface stays as it was
        there = {i.name for i in ort_model.model.graph.input}
        ort_model.model.graph.input.extend(i for i in inputs if i.name not in there)
        out = ctx.stage_dir("quantize_fp16") / "model.onnx"
        onnx.save_model(ort_model.model, str(out))
        counts = Counter(n.op_type for n in ort_model.model.graph.node)
        fp16 = sum(1 for t in ort_model.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
        kept = sorted(op for op in self.keep_float if counts.get(op))
        report: dict[str, Any] = {
            "fp16_initializers": fp16,
            "casts_inserted": counts["Cast"] - casts_before,
            "fp32_islands": ", ".join(f"{op} x{counts[op]}" for op in kept) or "none",
        }
        if cache:
            report["kv_cache"] = f"fp16 ({len(cache)} inputs and outputs)"
        if tables:
            report["rotary_tables"] = f"fp32 ({len(tables)} nodes), cast to fp16 when done"
        fidelity_guard(self, artifact, out, ctx, report, [], hint="Keep more op types in fp32 with `keep_float`.")
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, artifact.config), report)


def rotary_table_nodes(model: Any) -> list[str]:
    """Names of the nodes that compute rotary cos/sin tables: every ancestor of a Cos or Sin node, when
    none of them reads a float graph input (the chain starts from positions, shapes and constants)."""
    import onnx

    producers = {o: n for n in model.graph.node for o in n.output if o}
    floats = {
        i.name
        for i in model.graph.input
        if i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    }
    names: list[str] = []
    for start in (n for n in model.graph.node if n.op_type in ("Cos", "Sin")):
        chain, todo, seen = [], [start], set()
        while todo:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            chain.append(node)
            todo += [producers[i] for i in node.input if i in producers]
        reads = {i for n in chain for i in n.input}
        if not reads & floats and all(n.name for n in chain):
            names += [n.name for n in chain if n.name not in names]
    return names
