"""``compile.fuse``: rewrite the exported graph into ONNX Runtime's fused contrib ops.

For BERT-family encoders this is ONNX Runtime's transformers optimizer, which turns each layer's
~40 nodes into Attention, SkipLayerNormalization and BiasGelu (and the embeddings into
EmbedLayerNormalization). These com.microsoft kernels run on the CPU and CUDA execution providers.

What we add around it: op counts in the report, a contract (``expect``) that fails the stage when a
fusion silently stops matching, and a parity check of the fused graph against the unfused one.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from pydantic import Field

from slimline.artifact import OnnxModel
from slimline.compile.parity import compare, sample_feeds
from slimline.errors import StageError
from slimline.runtime import ort_function, quiet
from slimline.stage import Context, Stage, StageResult

# transformers model_type -> ONNX Runtime optimizer model_type (the encoders it has fusions for)
ORT_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "mpnet": "bert",
}
SKIP_FLAGS = {  # fused op -> the FusionOptions switches that produce it
    "Attention": ["enable_attention"],
    "EmbedLayerNormalization": ["enable_embed_layer_norm"],
    "SkipLayerNormalization": ["enable_skip_layer_norm", "enable_bias_skip_layer_norm"],
    "BiasGelu": ["enable_bias_gelu"],
    "Gelu": ["enable_gelu", "enable_bias_gelu"],
    "LayerNormalization": ["enable_layer_norm"],
}
FUSED_OPS = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "LayerNormalization",
    "GroupQueryAttention",
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "RotaryEmbedding",
    "FusedMatMul",
)


class Fuse(Stage):
    """Fuse into ONNX Runtime contrib ops; check the counts against ``expect`` and the outputs."""

    kind = "compile.fuse"
    consumes = (OnnxModel,)

    engine: Literal["ort"] = Field(
        "ort", description="encoders: ONNX Runtime's transformers optimizer; decoders use onnxscript's ort_fusions"
    )
    expect: dict[str, int] = Field(default_factory=dict, description="minimum count per fused op, e.g. {Attention: 6}")
    allow_partial: bool = Field(False, description="a shortfall against `expect` warns instead of failing")
    atol: float = Field(1e-3, gt=0, description="max abs error of fused vs unfused before the stage fails")
    skip: list[
        Literal["Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu", "Gelu", "LayerNormalization"]
    ] = Field(
        default_factory=list,
        description="fusions to leave out, e.g. [Attention] so that static int8 can quantize the QKV MatMuls",
    )

    def run(self, artifact: OnnxModel, ctx: Context) -> StageResult:
        import onnx
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        config = artifact.config
        if artifact.info.task == "text-generation":
            return self._run_decoder(artifact, ctx)
        model_type = ORT_MODEL_TYPES.get(config.model_type)
        if model_type is None:
            raise StageError(
                f"compile.fuse: no fusion rules for model_type `{config.model_type}` yet (known: "
                f"{', '.join(sorted(ORT_MODEL_TYPES))}). Remove compile.fuse from the recipe to ship the unfused graph."
            )
        before = onnx.load(str(artifact.path), load_external_data=False)
        options = FusionOptions(model_type)
        for op in self.skip:
            for flag in SKIP_FLAGS[op]:
                setattr(options, flag, False)
        with quiet():  # its fusion logs are replaced by our counts, contract and parity check
            optimized = optimize_model(
                str(artifact.path),
                model_type=model_type,
                # pruned heads leave fewer heads than the config's count: 0 makes ORT read them off the graph
                num_heads=0 if getattr(config, "pruned_heads", None) else config.num_attention_heads,
                hidden_size=0 if getattr(config, "pruned_heads", None) else config.hidden_size,
                opt_level=0,  # graph-level fusions only; ORT's runtime optimizer still runs at load time
                use_gpu=False,
                optimization_options=options,
            )
        out = ctx.stage_dir("fuse") / "model.onnx"
        optimized.save_model_to_file(str(out))
        after = onnx.load(str(out), load_external_data=False)
        counts = Counter(n.op_type for n in after.graph.node)
        fused = {op: counts[op] for op in FUSED_OPS if counts.get(op)}

        report: dict = {f"fused.{op}": n for op, n in fused.items()}
        report["nodes_before"] = len(before.graph.node)
        report["nodes_after"] = len(after.graph.node)
        report["unfused.MatMul"] = counts.get("MatMul", 0)
        self._contract(fused, report, ctx)

        run_a, inputs = ort_function(artifact.path, ctx.threads)
        run_b, _ = ort_function(out, ctx.threads)
        texts = ctx.data.calibration[:8] if ctx.load_data else []
        parity = compare(run_a, run_b, sample_feeds(artifact.tokenizer, inputs, texts))
        report.update(parity.report())
        if not parity.max_abs_error <= self.atol:
            raise StageError(
                f"compile.fuse: the fused graph differs from the unfused one by {parity.max_abs_error:.3g} on "
                f"`{parity.worst_output}` ({parity.worst_case}), above atol={self.atol}. A fusion is wrong for "
                "these inputs; drop compile.fuse or report it with the model's config."
            )
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, config), report)

    def _contract(self, fused: dict[str, int], report: dict, ctx: Context) -> None:
        """Check ``expect``: a shortfall fails the stage, or warns with ``allow_partial``."""
        shortfall = {op: (n, fused.get(op, 0)) for op, n in self.expect.items() if fused.get(op, 0) < n}
        report["contract"] = "met" if not shortfall else "partial" if self.allow_partial else "failed"
        if shortfall:
            detail = ", ".join(f"{op}: expected {want}, got {got}" for op, (want, got) in shortfall.items())
            message = (
                f"compile.fuse: the fusion contract is not met ({detail}). The graph changed shape or a pattern "
                "stopped matching; those layers run unfused and slower. Fix the export, lower `expect`, or "
                "set `allow_partial: true` to accept it with a warning."
            )
            if not self.allow_partial:
                raise StageError(message)
            ctx.warn(message)

    def _run_decoder(self, artifact: OnnxModel, ctx: Context) -> StageResult:
        """Decoders: onnxscript's ONNX Runtime fusions (RMSNorm, skip RMSNorm, rotary, GroupQueryAttention).

        These rules are written for the dynamo exporter's graph, which compile.export produces for
        text-generation. Parity: prefill + 5 greedy decode steps, each graph with its own KV cache.
        """
        import onnx
        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        from slimline.compile.export_llm import decoder_parity, onnx_stepper, parity_prompts
        from slimline.compile.fusions.sibling_matmul import merge_sibling_matmuls

        if self.skip:
            raise StageError(
                "compile.fuse: `skip` applies to the encoder fusions; decoders use onnxscript's rule set as a whole."
            )
        before = onnx.load(str(artifact.path), load_external_data=False)
        with quiet():
            model, rules = optimize_for_ort(ir.load(str(artifact.path)))
        out = ctx.stage_dir("fuse") / "model.onnx"
        ir.save(model, str(out))
        after = onnx.load(str(out))
        rules["merged_sibling_matmuls"], rejected = merge_sibling_matmuls(after)  # slimline's own rule
        onnx.save_model(after, str(out))
        counts = Counter(n.op_type for n in after.graph.node)
        fused = {op: counts[op] for op in FUSED_OPS if counts.get(op)}
        report: dict = {"engine": "onnxscript ort_fusions"}
        report.update({f"fused.{op}": n for op, n in fused.items()})
        report.update({f"rules.{name}": n for name, n in rules.items() if n})
        report["nodes_before"] = len(before.graph.node)
        report["nodes_after"] = len(after.graph.node)
        report["unfused.MatMul"] = counts.get("MatMul", 0)
        for x, why in list(rejected.items())[:5]:
            report[f"rejected.merged_sibling_matmuls.{x}"] = why
        self._contract(fused, report, ctx)
        texts = ctx.data.calibration[:2] if ctx.load_data else []
        parity = decoder_parity(
            onnx_stepper(artifact.path, ctx.threads), onnx_stepper(out, ctx.threads), parity_prompts(artifact.tokenizer, texts)
        )
        report.update(parity)
        if not parity["parity.max_abs_error"] <= self.atol:
            raise StageError(
                f"compile.fuse: the fused decoder's logits differ from the unfused graph's by "
                f"{parity['parity.max_abs_error']:.3g} at {parity['parity.worst_case']}, above atol={self.atol}."
            )
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, artifact.config), report)
