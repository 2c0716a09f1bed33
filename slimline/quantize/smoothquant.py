"""``quantize.smoothquant``: move activation outliers into the weights before static int8 (Xiao et al. 2022).

For a MatMul ``Y = X W`` the input channels ``j`` can be rescaled exactly: ``X W = (X / s) (s W)``.
With ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (maxima over calibration tokens and over the rows
of every MatMul reading ``X``) the few huge activation channels that force a coarse int8 activation
scale are flattened, and per-channel weight quantization absorbs the wider weight rows.

Written here on the ONNX graph (ONNX Runtime's own SmoothQuant option needs Intel Neural Compressor's
removed module). Where ``X`` comes from a LayerNormalization / SimplifiedLayerNormalization read only
by the smoothed MatMuls (pre-norm decoders), ``1/s`` folds into its gamma (and beta); elsewhere
(post-norm BERT, whose normalised output is also the residual) a per-channel ``Mul`` is inserted on
the MatMuls' path only. The float graph computes the same function; the stage checks that on
calibration text and fails above ``rtol``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from slimline import onnxfile
from slimline.artifact import OnnxModel
from slimline.errors import StageError
from slimline.measure.inputs import calibration_feeds, check_texts
from slimline.quantize import calib
from slimline.quantize.common import loads_in_ort, matching_nodes, refuse_quantized, roles_are_known, weight_of
from slimline.stage import Context, Stage, StageResult

NORMS = ("LayerNormalization", "SimplifiedLayerNormalization")


class SmoothQuant(Stage):
    """Rescale activation channels into the MatMul weights (exact in float), lowering int8 activation ranges."""

    kind = "quantize.smoothquant"
    consumes = (OnnxModel,)

    alpha: float = Field(0.5, ge=0, le=1, description="migration strength: 0 keeps activations, 1 moves all range into weights")
    include: list[str] = Field(
        default_factory=list,
        description="MatMuls to smooth: node-name globs or layers by role, e.g. role:ffn.in (default: all with a constant weight)",
    )
    calibration_texts: int = Field(128, ge=8, le=100_000, description="texts whose activation maxima set the scales")
    rtol: float = Field(1e-4, gt=0, description="max change of the float model's outputs, relative to their largest value")

    @field_validator("include")
    @classmethod
    def _roles_are_known(cls, value: list[str]) -> list[str]:
        return roles_are_known(value)

    def run(self, artifact: OnnxModel, ctx: Context) -> StageResult:
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load(str(artifact.path))
        refuse_quantized(model, self.kind)
        readers: dict[str, list[Any]] = defaultdict(list)  # activation -> MatMuls with a constant weight
        chosen = matching_nodes(model, self.include, ctx, self.kind, key="include") if self.include else None
        for node in model.graph.node:
            if node.op_type == "MatMul" and weight_of(model, node) is not None:
                if chosen is None or node.name in chosen:
                    readers[node.input[0]].append(node)
        if not readers:
            raise StageError(f"{self.kind}: no MatMul with a constant weight matches include={self.include}.")
        texts = check_texts(ctx.data.calibration[: self.calibration_texts], self.kind)
        feeds = calibration_feeds(artifact.tokenizer, texts, [i.name for i in model.graph.input])
        acts = calib.capture(
            model, sorted(readers), feeds, max_rows=256, threads=ctx.threads, workdir=ctx.stage_dir("calibration")
        )

        init = {t.name: t for t in model.graph.initializer}
        consumers: dict[str, list[Any]] = defaultdict(list)
        for node in model.graph.node:
            for i in node.input:
                consumers[i].append(node)
        producer = {o: n for n in model.graph.node for o in n.output}
        report: dict[str, Any] = {"alpha": self.alpha, "activations": len(readers), "folded_into_norm": 0, "inserted_mul": 0}
        before, after = [], []
        for x_name, matmuls in readers.items():
            x_max = np.maximum(acts[x_name].absmax, 1e-5)
            weights = [numpy_helper.to_array(init[m.input[1]]) for m in matmuls]
            w_max = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0), 1e-5)
            s = np.maximum(x_max**self.alpha / w_max ** (1 - self.alpha), 1e-5).astype(np.float32)
            for m, w in zip(matmuls, weights, strict=True):  # weights may be shared: write a new one per MatMul
                name = f"{m.input[1]}_smooth"
                model.graph.initializer.append(numpy_helper.from_array((w * s[:, None]).astype(np.float32), name))
                m.input[1] = name
            norm = producer.get(x_name)
            only_ours = {id(n) for n in consumers[x_name]} == {id(n) for n in matmuls} and x_name not in {
                o.name for o in model.graph.output
            }
            if norm is not None and norm.op_type in NORMS and only_ours and all(i in init for i in norm.input[1:]):
                for i in norm.input[1:]:  # gamma (and beta)
                    scaled = numpy_helper.to_array(init[i]) / s
                    new = f"{i}_smooth_{len(model.graph.initializer)}"
                    model.graph.initializer.append(numpy_helper.from_array(scaled.astype(np.float32), new))
                    norm.input[list(norm.input).index(i)] = new
                report["folded_into_norm"] += 1
            else:
                inv = f"{x_name}_smooth_inv"
                model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
                smoothed = f"{x_name}_smoothed"
                model.graph.node.append(helper.make_node("Mul", [x_name, inv], [smoothed], name=f"{matmuls[0].name}_smooth"))
                for m in matmuls:
                    m.input[0] = smoothed
                report["inserted_mul"] += 1
            before.append(float(x_max.max()))
            after.append(float((x_max / s).max()))
            report[f"act_max.{matmuls[0].name}"] = f"{before[-1]:.2f} -> {after[-1]:.2f}"
        drop = {n for n in init if not any(n in nd.input for nd in model.graph.node)}
        keep = [t for t in model.graph.initializer if t.name not in drop]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        sort_topologically(model)
        out = ctx.stage_dir("quantize_smoothquant") / "model.onnx"
        model = onnxfile.save_stage(model, out)
        loads_in_ort(out, self.kind)
        report["act_max.largest_before"] = round(max(before), 3)
        report["act_max.largest_after"] = round(max(after), 3)
        report["float_output_change"] = self._check(artifact, out, feeds[:2], ctx)
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, artifact.config), report)

    def _check(self, artifact: OnnxModel, out: Any, feeds: list[dict], ctx: Context) -> float:
        from slimline.runtime import ort_function

        ref, _ = ort_function(artifact.path, ctx.threads)
        new, _ = ort_function(out, ctx.threads)
        change = 0.0
        for f in feeds:
            a, b = next(iter(ref(f).values())), next(iter(new(f).values()))
            change = max(change, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)))
        if change > self.rtol:
            raise StageError(
                f"{self.kind}: rescaling changed the float graph's outputs by {change:.2e} of their range (> rtol {self.rtol}). "
                "Lower alpha, or narrow `include`."
            )
        return round(change, 7)


def sort_topologically(model: Any) -> None:
    """Reorder the graph's nodes so that every input is produced before it is read (inserted Muls)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise StageError("quantize.smoothquant: the graph has a cycle or an input nobody produces.")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
