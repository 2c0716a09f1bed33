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

fp16 holds values up to 65504, and the CPU EP (which the fidelity check runs on) hides overflow: it
computes most fp16 ops in fp32 behind inserted casts. So before converting, the stage runs the float
graph on calibration text and measures, for what fp16 would hold:

- every tensor's largest |value|: above 65504 the stage fails and names the tensors; the report gives
  the headroom (``fp16_headroom``);
- at every SkipLayerNormalization / SkipSimplifiedLayerNormalization left in fp16, each row's mean
  square. ONNX Runtime's CUDA kernels for these two ops sum x²/width in the input type
  (``skip_layer_norm_impl.cu``), so in fp16 a row whose mean square passes 65504 becomes inf, and the
  row normalises to zeros. The plain (Simplified)LayerNormalization kernels accumulate in fp32. Decoder
  LLMs put a "massive activation" on the first position: SmolLM2's residual reaches 24,926 in one
  channel there (mean square ~1.1e6), and with its norms in fp16 the CUDA EP zeroed that position's
  normalised hidden state in most layers. Such nodes are kept fp32 (``fp16_overflow_guard`` in the
  report) whenever the measured mean square passes half of 65504. (Caveat, measured 2026-12-04 on an
  H200: onnxruntime-gpu 1.31.1's kernel kept a single-op row with that activation finite, at
  SmolLM2's width of 576; the guard stays, as the conservative choice, until the whole graph is
  re-checked without it. ``compile.fuse: {custom_ops: true}`` avoids the question: its
  ``ai.slimline.SkipRMSNorm`` accumulates in fp32, and the guard leaves it in fp16.)

bf16 is not offered: ONNX Runtime's CPU and CUDA EPs lack bf16 kernels for most contrib ops.
On the CPU EP most fp16 ops run through casts and are slower than fp32; the error is still measured
here, and the ``ort-cuda`` target is where the speed is.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from slimline import onnxfile
from slimline.artifact import OnnxModel
from slimline.errors import StageError
from slimline.quantize.common import fidelity_guard, refuse_quantized
from slimline.stage import Context, Stage, StageResult

WEIGHT_ONLY_OPS = frozenset({"MatMulNBits", "GatherBlockQuantized"})
FP16_MAX = 65504.0
# CUDA kernels that accumulate sum(x^2)/width in their input type (fp16 here); see the module docstring
HALF_ACCUMULATING_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
BIAS_INPUT = {"SkipLayerNormalization": 4, "SkipSimplifiedLayerNormalization": 3}  # input, skip, gamma, [beta,] bias

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
        report: dict[str, Any] = {}
        hot = self._range_guard(model, tables, artifact, ctx, report)
        inputs = [onnx.ValueInfoProto.FromString(i.SerializeToString()) for i in model.graph.input]
        with quiet(), contextlib.redirect_stdout(io.StringIO()):  # ORT prints its shape-inference failures
            # (ORT's symbolic shape inference can't type the decoder's contrib ops; ONNX's own can)
            ort_model.convert_float_to_float16(
                use_symbolic_shape_infer=not cache,
                keep_io_types=keep_io,
                op_block_list=list(self.keep_float),
                node_block_list=tables + hot,
            )
        # the converter drops graph inputs that nothing reads once blocked nodes are in play (a fused
        # decoder's position_ids): callers feed them all the same, so the interface stays as it was
        there = {i.name for i in ort_model.model.graph.input}
        ort_model.model.graph.input.extend(i for i in inputs if i.name not in there)
        out = ctx.stage_dir("quantize_fp16") / "model.onnx"
        ort_model.model = onnxfile.save_stage(ort_model.model, out)
        counts = Counter(n.op_type for n in ort_model.model.graph.node)
        fp16 = sum(1 for t in ort_model.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
        kept = sorted(op for op in self.keep_float if counts.get(op))
        hot_ops = Counter(n.op_type for n in model.graph.node if n.name in set(hot))
        guarded = [f"{op} x{k} (range check)" for op, k in sorted(hot_ops.items())]
        report.update(
            {
                "fp16_initializers": fp16,
                "casts_inserted": counts["Cast"] - casts_before,
                "fp32_islands": ", ".join([f"{op} x{counts[op]}" for op in kept] + guarded) or "none",
            }
        )
        if cache:
            report["kv_cache"] = f"fp16 ({len(cache)} inputs and outputs)"
        if tables:
            report["rotary_tables"] = f"fp32 ({len(tables)} nodes), cast to fp16 when done"
        fidelity_guard(self, artifact, out, ctx, report, [], hint="Keep more op types in fp32 with `keep_float`.")
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, artifact.config), report)

    def _range_guard(self, model: Any, tables: list[str], artifact: OnnxModel, ctx: Context, report: dict) -> list[str]:
        """Measure what fp16 would hold on calibration text (module docstring); fail on a tensor past
        fp16's range, and return the Skip norms whose fp16 accumulator would overflow, to keep in fp32."""
        from slimline.measure.inputs import calibration_feeds

        texts = ctx.data.calibration[:16] if ctx.load_data else []
        if not texts:
            ctx.warn(f"{self.kind}: no calibration text, so fp16's range was not checked (overflow shows on GPUs only).")
            return []
        blocked = set(tables)
        inputs = [i.name for i in model.graph.input]
        feeds = calibration_feeds(artifact.tokenizer, texts, inputs, batch=2, config=artifact.config)[:8]
        peaks, squares = fp16_ranges(model, set(self.keep_float), blocked, feeds, ctx.threads, ctx.stage_dir("quantize_fp16"))
        if peaks:
            name, peak = max(peaks.items(), key=lambda kv: kv[1])
            report["fp16_headroom"] = f"max |x| {peak:.4g} ({peak / FP16_MAX:.1%} of fp16's 65504) at {name}"
        over = sorted((kv for kv in peaks.items() if kv[1] > FP16_MAX), key=lambda kv: -kv[1])
        if over:
            producers = {o: n for n in model.graph.node for o in n.output}
            where = ", ".join(f"{t} ({producers[t].op_type}, {v:.4g})" for t, v in over[:3])
            raise StageError(
                f"{self.kind}: {len(over)} tensors exceed fp16's range (65504) on calibration text: {where}. "
                "Add their producing op types to `keep_float`, or keep the model in fp32."
            )
        hot = [n for n, ms in squares.items() if ms > FP16_MAX / 2]
        if hot:
            worst = max(squares[n] for n in hot)
            report["fp16_overflow_guard"] = (
                f"{len(hot)} of {len(squares)} Skip*LayerNormalization nodes kept fp32: row mean square up to "
                f"{worst:.3g} on calibration text; CUDA sums it in fp16 (max 65504)"
            )
            ctx.warn(f"{self.kind}: {report['fp16_overflow_guard']}.")
        return hot


def fp16_ranges(
    model: Any, keep_ops: set[str], keep_nodes: set[str], feeds: list[dict], threads: int, workdir: Path
) -> tuple[dict[str, float], dict[str, float]]:
    """Run the float graph on ``feeds`` and measure (1) the largest |value| of each float tensor that the
    fp16 graph would hold (made or read by a node not kept in fp32), and (2) the largest row mean square
    of input + skip (+ bias) at each Skip*LayerNormalization node that would run in fp16."""
    import onnx
    from onnx import numpy_helper

    from slimline.runtime import ort_session

    fp16 = [n for n in model.graph.node if n.op_type not in keep_ops and n.name not in keep_nodes]
    outputs = {o.name for o in model.graph.output}
    held = {t for n in fp16 for t in (*n.input, *n.output) if t}
    made = [o for n in model.graph.node for o in n.output if o and o in held]
    norms = [n for n in fp16 if n.op_type in HALF_ACCUMULATING_NORMS and n.name]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    summed = {n.name: [i for i in (*n.input[:2], *n.input[BIAS_INPUT[n.op_type] :][:1]) if i] for n in norms}
    wanted = list(dict.fromkeys(made + [i for n in norms for i in summed[n.name] if i not in inits]))
    extended = onnx.ModelProto.FromString(model.SerializeToString())
    extended.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in wanted if t not in outputs)
    path = Path(workdir) / "ranges.onnx"
    onnx.save_model(extended, str(path), save_as_external_data=True, location="ranges.onnx.data")
    peaks: dict[str, float] = {}
    squares: dict[str, float] = {n.name: 0.0 for n in norms}
    try:
        session = ort_session(path, threads)
        names = {i.name for i in session.get_inputs()}
        for feed in feeds:
            values = dict(zip(wanted, session.run(wanted, {k: v for k, v in feed.items() if k in names}), strict=True))
            for t in made:
                v = values[t]
                if v.dtype.kind == "f" and v.size:
                    peaks[t] = max(peaks.get(t, 0.0), float(np.abs(v).max()))
            for n in norms:  # input + skip (+ bias): the row the kernel normalises
                x = sum(np.asarray(values[i] if i in values else inits[i], np.float64) for i in summed[n.name])
                squares[n.name] = max(squares[n.name], float((x * x).mean(-1).max()))
    finally:
        path.unlink(missing_ok=True)
        Path(str(path) + ".data").unlink(missing_ok=True)
    return peaks, squares


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
