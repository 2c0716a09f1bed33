"""``compile.fuse``: rewrite the exported graph into ONNX Runtime's fused contrib ops.

The default engine is slimline's own (``slimline.compile.fusions``): declarative onnxscript rewrite
rules, one module per fused op, for encoders (EmbedLayerNormalization, Attention,
SkipLayerNormalization, BiasGelu) and decoders (SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization, RotaryEmbedding, GroupQueryAttention), on graphs from both
exporters. ``engine: ort`` runs ONNX Runtime's transformers optimizer instead (BERT family only).
These com.microsoft kernels run on the CPU and CUDA execution providers.

Around either engine: op counts in the report, a contract (``expect``) that fails the stage when a
fusion silently stops matching and names each unfused layer with the rule's rejection reason, a
check that ONNX and ONNX Runtime load the result, and a parity check against the unfused graph.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Literal

from pydantic import Field

from slimline import onnxfile
from slimline.artifact import OnnxModel
from slimline.compile.fusions.registry import fused_ops, ort_switches, skip_names
from slimline.errors import StageError
from slimline.family import expected_fusions, family_of
from slimline.measure.inputs import parity_prompts, sample_feeds
from slimline.measure.parity import compare, decoder_parity
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
SkipName = Literal[skip_names()]  # type: ignore[valid-type]  # derived from the fusion registry


class Fuse(Stage):
    """Fuse into ONNX Runtime contrib ops; check the counts against ``expect`` and the outputs."""

    kind = "compile.fuse"
    consumes = (OnnxModel,)

    engine: Literal["slimline", "ort"] = Field(
        "slimline",
        description="slimline's fusion rules (encoders and decoders), or ONNX Runtime's transformers optimizer (BERT family)",
    )
    expect: dict[str, Annotated[int, Field(ge=0, le=1_000_000)]] | Literal["auto"] = Field(
        default_factory=dict,
        description="minimum count per fused op, e.g. {Attention: 6}; auto: computed from the model's config (layers, type)",
    )
    allow_partial: bool = Field(False, description="a shortfall against `expect` warns instead of failing")
    atol: float = Field(1e-3, gt=0, description="max abs error of fused vs unfused before the stage fails")
    skip: list[SkipName] = Field(
        default_factory=list,
        description="fusions to leave out, e.g. [Attention] so that static int8 can quantize the QKV MatMuls",
    )
    rotary_tables: bool = Field(
        False,
        description="decoders: store the rotary cos/sin caches as constant tables for the model's whole context instead "
        "of computing them every run (fewer kernels per step; lets ONNX Runtime capture a decode step as a CUDA graph)",
    )
    custom_ops: bool = Field(
        False,
        description="use slimline's own kernels where ONNX Runtime's fall short (SkipRMSNorm: fp32 accumulation in fp16 "
        "graphs); needs `slimline ops build`",
    )

    def run(self, artifact: OnnxModel, ctx: Context) -> StageResult:
        import onnx
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        config = artifact.config
        if family_of(artifact.info.task).is_decoder:
            return self._run_decoder(artifact, ctx)
        if self.engine == "slimline":
            return self._run_slimline(artifact, ctx)
        model_type = ORT_MODEL_TYPES.get(config.model_type)
        if model_type is None:
            raise StageError(
                f"compile.fuse: ONNX Runtime's optimizer has no rules for model_type `{config.model_type}` (known: "
                f"{', '.join(sorted(ORT_MODEL_TYPES))}) in `engine: ort`. Use the default `engine: slimline`, whose rules "
                "match graph patterns rather than model types."
            )
        before = onnx.load(str(artifact.path), load_external_data=False)
        options = FusionOptions(model_type)
        for op in self.skip:
            for flag in ort_switches().get(op, ()):  # decoder ops: ORT's BERT optimizer never makes them
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
        fused = {op: counts[op] for op in fused_ops() if counts.get(op)}

        report: dict = {f"fused.{op}": n for op, n in fused.items()}
        report["nodes_before"] = len(before.graph.node)
        report["nodes_after"] = len(after.graph.node)
        report["unfused.MatMul"] = counts.get("MatMul", 0)
        self._contract(fused, report, ctx, expect=self.expected(artifact, report, ctx))

        self._encoder_parity(artifact, out, report, ctx, "drop compile.fuse or report it with the model's config")
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, config), report)

    def _encoder_parity(self, artifact: OnnxModel, out, report: dict, ctx: Context, fix: str) -> None:
        """Fused vs unfused on random padded batches of several shapes and real texts; fail above atol."""
        run_a, inputs = ort_function(artifact.path, ctx.threads)
        run_b, _ = ort_function(out, ctx.threads)
        texts = ctx.data.calibration[:8] if ctx.load_data else []
        try:
            parity = compare(run_a, run_b, sample_feeds(artifact.tokenizer, inputs, texts))
        except Exception as err:  # a fused kernel that refuses these inputs at run time
            raise StageError(
                f"compile.fuse: the fused graph fails at run time ({str(err).splitlines()[0][:300]}). A fusion is "
                f"wrong for these inputs; {fix}."
            ) from None
        report.update(parity.report())
        if not parity.max_abs_error <= self.atol:
            raise StageError(
                f"compile.fuse: the fused graph differs from the unfused one by {parity.max_abs_error:.3g} on "
                f"`{parity.worst_output}` ({parity.worst_case}), above atol={self.atol}. A fusion is wrong for "
                f"these inputs; {fix}."
            )

    def expected(self, artifact: OnnxModel, report: dict, ctx: Context) -> dict[str, int]:
        """The contract: ``expect`` as written, or (``auto``) the family's, computed from the config.
        Ops in ``skip`` are left out of it."""
        if self.expect != "auto":
            return self.expect
        contract, how = expected_fusions(family_of(artifact.info.task), artifact.config)
        report["contract.auto"] = how
        if not contract:
            ctx.warn(
                f"compile.fuse: expect: auto has no contract for this model ({how}); the fused counts are reported unchecked."
            )
        return {op: n for op, n in contract.items() if op not in self.skip}

    def _contract(
        self, fused: dict[str, int], report: dict, ctx: Context, unfused: list[dict] | None = None, expect: dict | None = None
    ) -> None:
        """Check the contract: a shortfall fails the stage, or warns with ``allow_partial``.

        With slimline's engine the message names each unfused layer and why its rule rejected it.
        """
        expect = self.expect if expect is None else expect
        report["contract.expected"] = ", ".join(f"{op} {n}" for op, n in expect.items()) or "nothing"
        shortfall = {op: (n, fused.get(op, 0)) for op, n in expect.items() if fused.get(op, 0) < n}
        report["contract"] = "met" if not shortfall else "partial" if self.allow_partial else "failed"
        for op, (want, got) in shortfall.items():
            report[f"unfused.{op}"] = want - got
        if shortfall:
            detail = ", ".join(f"{op}: expected {want}, got {got}" for op, (want, got) in shortfall.items())
            lines = [
                f"  {u['op']} at {u['where']} ({u['node']}): {u['rule'] + ' ' if u['rule'] else ''}{u['reason']}"
                for u in (unfused or [])
                if u["op"] in shortfall
            ]
            if len(lines) > 12:
                lines = lines[:12] + [f"  ... and {len(lines) - 12} more (slimline inspect --fusions MODEL.onnx lists all)"]
            message = (
                f"compile.fuse: the fusion contract is not met ({detail}). The graph changed shape or a pattern "
                "stopped matching; those layers run unfused and slower."
                + ("\nUnfused:\n" + "\n".join(lines) if lines else "")
                + "\nFix the export, lower `expect`, or set `allow_partial: true` to accept it with a warning."
            )
            if not self.allow_partial:
                raise StageError(message)
            ctx.warn(message)

    def _fuse_with_rules(self, artifact: OnnxModel, ctx: Context) -> tuple:
        """slimline's engine: fuse, save (external data above 1.5 GB), prove ONNX and ORT load it."""
        import onnx
        import onnx_ir as ir

        from slimline.compile.fusions import UnsupportedGraph, fuse_to_proto

        try:
            model = ir.load(str(artifact.path))
            # weights in external data (exports over 1.8 GB) come into memory: the graph passes read
            # them, and the fused file is written in another folder, where the old references would dangle
            model = ir.external_data.load_to_model(model)
        except Exception as err:  # protobuf/ir errors for corrupt files
            raise StageError(f"compile.fuse: can't read {artifact.path} ({type(err).__name__}): is the file complete?") from None
        try:
            with quiet():
                after, result, rejected = fuse_to_proto(model, family_of(artifact.info.task).is_decoder, tuple(self.skip))
        except UnsupportedGraph as err:
            raise StageError(f"compile.fuse: {err}") from None
        rotary = ""
        if self.rotary_tables:
            from slimline.compile.fusions.rotary_tables import fold_rotary_tables

            context = getattr(artifact.config, "max_position_embeddings", None)
            if not context:
                raise StageError(
                    "compile.fuse: rotary_tables needs the model config's max_position_embeddings (the tables' length)."
                )
            _, rotary = fold_rotary_tables(after, int(context))
        custom: dict[str, int] = {}
        if self.custom_ops:
            custom, not_custom = self._to_custom_ops(after, ctx)
        out = ctx.stage_dir("fuse") / "model.onnx"
        after = onnxfile.save_stage(after, out)
        try:
            try:
                onnx.checker.check_model(str(out))
            except onnx.checker.ValidationError as err:
                # ORT registers SimplifiedLayerNormalization in the default domain, which onnx's checker doesn't know
                if "No Op registered for SimplifiedLayerNormalization" not in str(err):
                    raise
            ort_function(out, ctx.threads)
        except Exception as err:  # never hand on a graph ONNX or ONNX Runtime refuses
            for path in out.parent.glob("model.onnx*"):
                path.unlink()
            raise StageError(
                f"compile.fuse: the fused graph does not load ({type(err).__name__}: {str(err).splitlines()[0][:300]}). "
                "This is a bug in a fusion rule; `skip` the fused op named in the error, or use `engine: ort`, and report it."
            ) from None
        counts = Counter(n.op_type for n in after.graph.node)
        report: dict = {"engine": "slimline"}
        report.update({f"fused.{op}": n for op, n in result.counts.items()})
        if rotary:
            report["rotary_tables"] = rotary
        if self.custom_ops:
            report.update({f"custom_ops.{op}": n for op, n in custom.items()} or {"custom_ops": "none matched"})
            for node, why in list(not_custom.items())[:5]:
                report[f"custom_ops.left.{node}"] = why
        report.update({f"rules.{name}": n for name, n in result.steps.items() if n})
        report["nodes_before"] = result.nodes_before
        report["nodes_after"] = len(after.graph.node)
        report["unfused.MatMul"] = counts.get("MatMul", 0)
        for x, why in list(rejected.items())[:5]:
            report[f"rejected.merged_sibling_matmuls.{x}"] = why
        for u in result.unfused[:20]:
            report[f"unfused_at.{u['op']}.{u['where']}"] = u["reason"]
        self._contract(result.counts, report, ctx, result.unfused, self.expected(artifact, report, ctx))
        return out, report

    def _to_custom_ops(self, model, ctx: Context) -> tuple[dict[str, int], dict[str, str]]:
        """Hand fused nodes to slimline's kernels (compile.fusions.custom_ops); the library must be built, since
        the stage's own checks run the result."""
        from slimline.compile.fusions.custom_ops import to_custom_ops
        from slimline.ops import OpsUnavailable, require

        try:
            require()
        except OpsUnavailable as err:
            raise StageError(f"compile.fuse: custom_ops: {err}") from None
        counts, skipped = to_custom_ops(model)
        if skipped:
            ctx.warn(f"compile.fuse: custom_ops left {len(skipped)} nodes to ONNX Runtime's kernels (the report says why).")
        return counts, skipped

    def _run_slimline(self, artifact: OnnxModel, ctx: Context) -> StageResult:
        out, report = self._fuse_with_rules(artifact, ctx)
        self._encoder_parity(artifact, out, report, ctx, "`skip` it or use `engine: ort`, and report it with the model's config")
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, artifact.config), report)

    def _run_decoder(self, artifact: OnnxModel, ctx: Context) -> StageResult:
        """Decoders: slimline's engine (RMSNorm, skip RMSNorm, rotary, GroupQueryAttention) plus the
        sibling-MatMul merge. Parity: prefill + 5 greedy decode steps, each graph with its own KV cache.
        """
        from slimline.compile.export_llm import onnx_stepper

        if self.engine == "ort":
            raise StageError(
                "compile.fuse: `engine: ort` (ONNX Runtime's transformers optimizer) has no rules for this decoder's "
                "dynamo graph; use the default `engine: slimline`."
            )
        out, report = self._fuse_with_rules(artifact, ctx)
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
