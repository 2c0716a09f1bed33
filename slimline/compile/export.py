"""``compile.export``: a transformers model to ONNX, with dynamic batch and sequence axes.

The export itself is optimum-onnx's (it knows each architecture's inputs and dynamic axes). What we
add: a parity check of ONNX Runtime against torch on padded random and real inputs, which fails the
stage above ``atol`` instead of shipping a graph that is silently wrong.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from typing import Literal

from pydantic import Field

from slimline.artifact import OnnxModel, TorchModel
from slimline.errors import StageError
from slimline.family import family_of
from slimline.measure.inputs import parity_prompts, sample_feeds
from slimline.measure.parity import compare, decoder_parity
from slimline.runtime import ort_function, quiet
from slimline.stage import Context, Stage, StageResult

OPTIMUM_TASK = {
    "feature-extraction": "feature-extraction",
    "text-classification": "text-classification",
    "token-classification": "token-classification",
}


class Export(Stage):
    """Export to ONNX with optimum-onnx and check ONNX Runtime against torch."""

    kind = "compile.export"
    consumes = (TorchModel,)
    produces = OnnxModel

    opset: int = Field(18, ge=14, le=21, description="ONNX opset (>= 17 keeps LayerNormalization one op)")
    exporter: Literal["optimum", "dynamo"] = Field(
        "optimum",
        description="encoders: optimum-onnx (TorchScript-based) or torch.onnx's dynamo exporter; decoders always use dynamo",
    )
    atol: float = Field(1e-4, gt=0, description="max abs error of ORT vs torch before the stage fails")

    def run(self, artifact: TorchModel, ctx: Context) -> StageResult:
        if family_of(artifact.info.task).is_decoder:
            return self._run_decoder(artifact, ctx)
        import onnx
        import torch

        out_dir = ctx.stage_dir("export")
        start = time.perf_counter()
        if self.exporter == "dynamo":
            self._dynamo_encoder(artifact, out_dir / "model.onnx")
        else:
            self._optimum(artifact, out_dir)
        path = out_dir / "model.onnx"
        export_s = time.perf_counter() - start

        graph = onnx.load(str(path), load_external_data=False)
        run_onnx, input_names = ort_function(path, ctx.threads)
        model = artifact.model
        output_names = [o.name for o in graph.graph.output]

        def run_torch(feeds):
            with torch.no_grad():
                out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            return {name: out[i].numpy() for i, name in enumerate(output_names) if i < len(out)}

        texts = ctx.data.calibration[:8] if ctx.load_data else []
        parity = compare(run_torch, run_onnx, sample_feeds(artifact.tokenizer, input_names, texts))
        report = {
            "opset": self.opset,
            "export_s": round(export_s, 2),
            "nodes": len(graph.graph.node),
            "inputs": ", ".join(input_names),
            "outputs": ", ".join(output_names),
            "size_mb": round(path.stat().st_size / 1e6, 2) if path.exists() else 0.0,
            **parity.report(),
        }
        report.update({f"ops.{op}": n for op, n in Counter(n.op_type for n in graph.graph.node).most_common(5)})
        if not parity.max_abs_error <= self.atol:
            raise StageError(
                f"compile.export: ONNX Runtime differs from torch by {parity.max_abs_error:.3g} on output "
                f"`{parity.worst_output}` ({parity.worst_case}), above atol={self.atol}. The exported graph "
                "is wrong for these inputs; try another opset, or raise `atol` if the drift is expected."
            )
        onnx_model = OnnxModel(path=path, tokenizer=artifact.tokenizer, info=artifact.info, config=artifact.config)
        return StageResult(onnx_model, report)

    def _optimum(self, artifact: TorchModel, out_dir) -> None:
        from optimum.exporters.onnx import onnx_export_from_model

        try:
            # The model object decides the library (transformers), so sentence-transformers being
            # installed can't swap in its own graph here, as it does with optimum-cli.
            with quiet():  # tracer and opset chatter that is not the user's concern
                onnx_export_from_model(
                    artifact.model,
                    out_dir,
                    task=OPTIMUM_TASK[artifact.info.task],
                    opset=self.opset,
                    do_validation=False,
                )
        except (ValueError, KeyError, NotImplementedError) as err:
            raise StageError(
                f"compile.export: optimum-onnx can't export model_type `{artifact.config.model_type}` for "
                f"task {artifact.info.task}: {str(err).splitlines()[0][:300]}"
            ) from None

    def _dynamo_encoder(self, artifact: TorchModel, path) -> None:
        """torch.onnx's dynamo exporter, dynamic batch and sequence; the same inputs as optimum's graph."""
        import torch

        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in artifact.tokenizer.model_input_names]
        # distinct tensors per input, or the exporter treats them as one
        example = {n: torch.full((2, 16), 0 if n == "token_type_ids" else 1, dtype=torch.long) for n in names}
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        try:
            with quiet():
                program = torch.onnx.export(
                    artifact.model,
                    (),
                    kwargs=example,
                    dynamo=True,
                    opset_version=self.opset,
                    input_names=names,
                    output_names=["last_hidden_state" if artifact.info.task == "feature-extraction" else "logits"],
                    dynamic_shapes={n: {0: batch, 1: seq} for n in names},
                )
                program.save(str(path))
        except Exception as err:  # torch.export's errors are long; the first line names the construct
            raise StageError(
                f"compile.export: torch.onnx (dynamo) could not export `{artifact.config.model_type}`: "
                f"{str(err).strip().splitlines()[0][:300]}. Try `exporter: optimum`."
            ) from None

    def _run_decoder(self, artifact: TorchModel, ctx: Context) -> StageResult:
        """Decoder LLMs: dynamo export with the KV cache as inputs/outputs; parity over prefill + decode."""
        import onnx

        from slimline.compile.export_llm import export_decoder, length_dependent_rope, onnx_stepper, torch_stepper

        path = ctx.stage_dir("export") / "model.onnx"
        start = time.perf_counter()
        config, found = artifact.config, length_dependent_rope(artifact.model)
        rope_limit = found[1] if found else None
        if rope_limit:  # the artifact serves up to the pre-training length; preflight and generate hold it there
            config = copy.deepcopy(artifact.config)
            config.max_position_embeddings = min(config.max_position_embeddings, rope_limit)
            scaling = getattr(artifact.config, "rope_scaling", None) or {}
            ctx.warn(
                f"compile.export: `{config.model_type}` switches its rotary frequencies by sequence length "
                f"({scaling.get('rope_type') or scaling.get('type') or 'dynamic'}), a branch torch.export can't capture: "
                f"the export keeps the original frequencies and serves up to {rope_limit} positions."
            )
        with quiet():
            try:
                export_decoder(artifact.model, path, self.opset)
            except StageError:
                raise
            except Exception as err:  # torch.export's errors are long; the first line names the construct
                raise StageError(
                    f"compile.export: torch.onnx (dynamo) could not export `{artifact.config.model_type}`: "
                    f"{str(err).strip().splitlines()[0][:300]}"
                ) from None
        export_s = time.perf_counter() - start
        graph = onnx.load(str(path), load_external_data=False)
        texts = ctx.data.calibration[:2] if ctx.load_data else []
        prompts = parity_prompts(artifact.tokenizer, texts)
        parity = decoder_parity(torch_stepper(artifact.model), onnx_stepper(path, ctx.threads), prompts)
        atol = self.atol * 10  # logits are O(10): the same relative precision as an encoder's hidden states
        report = {
            "opset": self.opset,
            "exporter": "torch.onnx (dynamo)",
            "export_s": round(export_s, 2),
            "nodes": len(graph.graph.node),
            "inputs": len(graph.graph.input),
            "size_mb": round(sum(p.stat().st_size for p in path.parent.glob("model.onnx*")) / 1e6, 2),
            **parity,
        }
        report.update({f"ops.{op}": n for op, n in Counter(n.op_type for n in graph.graph.node).most_common(5)})
        if rope_limit:
            report["rope.fixed_max_positions"] = rope_limit
        if not parity["parity.max_abs_error"] <= atol:
            raise StageError(
                f"compile.export: ONNX Runtime's logits differ from torch by {parity['parity.max_abs_error']:.3g} at "
                f"{parity['parity.worst_case']}, above {atol:.2g} (10 x atol). The exported graph or its KV cache is wrong."
            )
        return StageResult(OnnxModel(path=path, tokenizer=artifact.tokenizer, info=artifact.info, config=config), report)
