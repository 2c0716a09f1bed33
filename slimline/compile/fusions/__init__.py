"""slimline's fusion engine: rewrite rules into ONNX Runtime's com.microsoft kernels, with reasons.

One module per fused op (each with an ASCII sketch of what it matches). ``fuse_model`` runs them in
an order where no rule steals another's subgraph, then counts the fused ops in the final graph and,
for every candidate left unfused, asks each rule (in onnxscript's tracing mode, which changes
nothing) how far it got and why it stopped. That is what a contract shortfall and
``slimline inspect --fusions`` print.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from slimline.compile.fusions import gemm, static_shape
from slimline.compile.fusions._base import Tracer, layer_of, locate
from slimline.compile.fusions.registry import FUSED_OPS_TABLE, GRAPH_PASSES, FusedOp, fused_ops, skipped
from slimline.measure.inputs import LOGITS_TO_KEEP

SUPPORTED_OPSETS = range(17, 24)  # LayerNormalization is one op from 17; onnxscript's rules are written for 18+


class UnsupportedGraph(ValueError):
    """The graph can't go through the fusion rules (an opset or a shape of graph we don't handle)."""


@dataclass
class FusionResult:
    model: Any  # onnx_ir.Model, rewritten in place
    counts: dict[str, int]  # fused op -> nodes in the final graph
    steps: dict[str, int]  # step -> matches it made
    nodes_before: int
    nodes_after: int
    unfused: list[dict] = field(default_factory=list)  # {op, where, node, rule, reason}

    def unfused_for(self, op: str) -> list[dict]:
        return [u for u in self.unfused if u["op"] == op]


def fused_counts(model: Any) -> dict[str, int]:
    counts = Counter(node.op_type for node in model.graph.all_nodes())
    return {op: counts[op] for op in fused_ops() if counts.get(op) and op != "LayerNormalization"}  # a standard op since opset 17


def _run(record: FusedOp, model: Any, tracer: Tracer | None = None) -> int:
    from onnxscript.rewriter import RewriteRuleSet

    runner = (record.diagnose_with or record.apply) if tracer is not None else record.apply
    if runner is not None:
        return runner(model, tracer=tracer)
    return RewriteRuleSet(record.module.rules()).apply_to_model(model, tracer=tracer)


def check_opset(model: Any) -> int:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None or opset not in SUPPORTED_OPSETS:
        raise UnsupportedGraph(
            f"opset {opset}: slimline's fusion rules support opsets {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} "
            "(below 17 LayerNormalization is decomposed into a dozen ops). Re-export with `compile.export: {opset: 18}`."
        )
    return opset


def fuse_model(model: Any, skip: tuple[str, ...] = (), diagnose: bool = True) -> FusionResult:
    """Fuse ``model`` (an onnx_ir.Model) in place; ``skip`` names fused ops to leave out."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import RewriteRuleSet, rewrite
    from onnxscript.rewriter.ort_fusions._core import ORT_PATTERN_REWRITE_RULES, _pre_optimize
    from onnxscript.rewriter.rules.common import _gemm_to_matmul_add

    check_opset(model)
    nodes_before = sum(1 for _ in model.graph)
    rewrite(model, [_gemm_to_matmul_add.gemm_to_matmul_add_rule])
    RewriteRuleSet(gemm.rules()).apply_to_model(model)
    _pre_optimize(model)
    static_shape.canonical_sums(model)
    RewriteRuleSet(static_shape.rules()).apply_to_model(model)
    optimize(model)  # constant-fold what the static shapes made constant (attention's scale)
    steps: dict[str, int] = {}
    unfused: list[dict] = []
    for record in FUSED_OPS_TABLE:
        if skipped(record, skip):
            continue
        steps[record.step] = _run(record, model)
        if steps[record.step]:
            common_passes.RemoveUnusedNodesPass()(model)  # blocks a rule replaced but kept (remove_nodes=False)
            common_passes.ShapeInferencePass()(model)  # fused outputs carry their shapes: propagate them
        if diagnose and record.diagnose:
            unfused += diagnose_step(model, record)
    if any(node.domain == "ai.onnxruntime._fusion" for node in model.graph):
        # onnxscript's intermediate SDPA op (no kernel) left when its consumer was skipped or rejected
        from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

        replace_sdpa_by_mha(model)
    static_shape.fold_constant_concats(model)
    optimize(model)
    rewrite(model, ORT_PATTERN_REWRITE_RULES)
    # initializers listed as inputs can't be folded, so they leave the inputs; an intended one stays
    # (compile.export's `logits_to_keep`, a default the caller may override)
    overridable = [v for v in model.graph.inputs if v.name == LOGITS_TO_KEEP and v.const_value is not None]
    ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
        common_passes.RemoveInitializersFromInputsPass(),
        common_passes.ShapeInferencePass(),
    )(model)
    model.graph.inputs.extend(v for v in overridable if v not in model.graph.inputs)
    return FusionResult(model, fused_counts(model), steps, nodes_before, sum(1 for _ in model.graph), unfused)


def fuse_to_proto(model: Any, decoder: bool, skip: tuple[str, ...] = (), diagnose: bool = True) -> tuple[Any, FusionResult, dict]:
    """What compile.fuse ships: the rules, then the registry's graph passes on the proto (for decoders
    the sibling-MatMul merge and packed Q/K/V into GroupQueryAttention). Returns (ModelProto, result,
    {input: why its MatMuls were not merged})."""
    import onnx_ir as ir

    result = fuse_model(model, skip=skip, diagnose=diagnose)
    proto, rejected = ir.to_proto(model), {}
    for graph_pass in GRAPH_PASSES:
        if graph_pass.decoder_only and not decoder:
            continue
        done = graph_pass.run(proto)
        if isinstance(done, tuple):  # (count, {input: why not})
            done, why = done
            rejected.update(why)
        result.steps[graph_pass.name] = done
    return proto, result, rejected


def diagnose_step(model: Any, record: FusedOp) -> list[dict]:
    """The candidates ``record``'s rules left unfused, each with its closest rule's reason (changes nothing)."""
    module = record.module
    candidate = getattr(module, "candidate", lambda node: True)
    anchors = [n for n in model.graph if n.op_type in getattr(module, "ANCHORS", ()) and candidate(n)]
    found: list[dict] = []
    if anchors:
        tracer = Tracer()
        _run(record, model, tracer)
        for anchor in anchors:
            attempt = tracer.explain(anchor)
            where = locate(anchor)
            found.append(
                {
                    "op": record.op,
                    "where": where,
                    "layer": layer_of(where),
                    "node": anchor.name or anchor.op_type,
                    "rule": attempt.rule if attempt else None,
                    "reason": (f"{attempt.status}: {attempt.reason}" if attempt else "no rule's pattern reached this node"),
                }
            )
    return found
