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

from slimline.compile.fusions import (
    attention,
    embed_layer_norm,
    gelu,
    group_query_attention,
    rms_norm,
    rotary_embedding,
    skip_layer_norm,
    skip_rms_norm,
    static_shape,
)
from slimline.compile.fusions._base import Tracer, layer_of, locate

# (step name, module, how to run it, diagnose after it). Order matters: the embedding sum looks like a skip-LayerNorm,
# slimline's BERT attention must see the graph before onnxscript's SDPA rule, and
# GroupQueryAttention must take decoders' SDPA before the MultiHeadAttention chain does.
# Each step's leftovers are diagnosed right after it, on the graph its rules saw (a later rule may
# take the same nodes: SkipLayerNormalization fuses an embedding sum EmbedLayerNormalization rejected).
STEPS: list[tuple[str, Any, Any, bool]] = [
    ("embed_layer_norm", embed_layer_norm, None, True),
    ("attention", attention, attention.apply, False),  # diagnosed after onnxscript's chain has had its turn
    ("rms_norm", rms_norm, None, True),
    ("skip_layer_norm", skip_layer_norm, None, True),
    ("skip_rms_norm", skip_rms_norm, None, True),
    ("rotary_embedding", rotary_embedding, rotary_embedding.apply, True),
    ("group_query_attention", group_query_attention, group_query_attention.apply, True),
    ("attention_chain", attention, lambda model, tracer=None: attention.apply_chain(model), True),
    ("gelu", gelu, None, True),
]
MODULES = {m.OP: m for _, m, _, _ in STEPS}
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
    from slimline.compile.fuse import FUSED_OPS

    counts = Counter(node.op_type for node in model.graph.all_nodes())
    return {op: counts[op] for op in FUSED_OPS if counts.get(op) and op != "LayerNormalization"}  # a standard op since opset 17


def _run(module: Any, runner: Any, model: Any, tracer: Tracer | None = None) -> int:
    from onnxscript.rewriter import RewriteRuleSet

    if runner is not None:
        return runner(model, tracer=tracer)
    return RewriteRuleSet(module.rules()).apply_to_model(model, tracer=tracer)


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
    _pre_optimize(model)
    RewriteRuleSet(static_shape.rules()).apply_to_model(model)
    optimize(model)  # constant-fold what the static shapes made constant (attention's scale)
    steps: dict[str, int] = {}
    unfused: list[dict] = []
    for name, module, runner, diagnosed in STEPS:
        if module.OP in skip or (module is gelu and "Gelu" in skip):
            continue
        steps[name] = _run(module, runner, model)
        if steps[name]:
            common_passes.RemoveUnusedNodesPass()(model)  # blocks a rule replaced but kept (remove_nodes=False)
            common_passes.ShapeInferencePass()(model)  # fused outputs carry their shapes: propagate them
        if diagnose and diagnosed:
            tracer_runner = attention.apply if module is attention else runner
            unfused += diagnose_step(model, module, tracer_runner)
    if any(node.domain == "ai.onnxruntime._fusion" for node in model.graph):
        # onnxscript's intermediate SDPA op (no kernel) left when its consumer was skipped or rejected
        from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

        replace_sdpa_by_mha(model)
    static_shape.fold_constant_concats(model)
    optimize(model)
    rewrite(model, ORT_PATTERN_REWRITE_RULES)
    # initializers listed as inputs can't be folded, so they leave the inputs; an intended one stays
    # (compile.export's `logits_to_keep`, a default the caller may override)
    from slimline.compile.export_llm import LOGITS_TO_KEEP

    overridable = [v for v in model.graph.inputs if v.name == LOGITS_TO_KEEP and v.const_value is not None]
    ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
        common_passes.RemoveInitializersFromInputsPass(),
        common_passes.ShapeInferencePass(),
    )(model)
    model.graph.inputs.extend(v for v in overridable if v not in model.graph.inputs)
    return FusionResult(model, fused_counts(model), steps, nodes_before, sum(1 for _ in model.graph), unfused)


# fused ops whose outputs after the first are optional statistics or side results
OPTIONAL_OUTPUTS = {
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
}


def drop_unused_outputs(model: Any) -> int:
    """Unname optional outputs nobody reads, so the kernels skip computing and writing them.

    onnxscript's norm fusions name every output of SkipSimplifiedLayerNormalization (mean and inverse
    standard deviation included); ONNX Runtime then allocates and fills them on every run. On SmolLM2
    the 60 skip norms took 0.43 ms of a decode step with them and 0.37 ms without. Returns the count.
    """
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dropped = 0
    for node in model.graph.node:
        if node.op_type not in OPTIONAL_OUTPUTS:
            continue
        outputs = list(node.output)
        for i in range(1, len(outputs)):
            if outputs[i] and outputs[i] not in read:
                outputs[i] = ""
                dropped += 1
        while len(outputs) > 1 and not outputs[-1]:
            outputs.pop()
        del node.output[:]
        node.output.extend(outputs)
    return dropped


def fuse_to_proto(model: Any, decoder: bool, skip: tuple[str, ...] = (), diagnose: bool = True) -> tuple[Any, FusionResult, dict]:
    """What compile.fuse ships: the rules, then for decoders slimline's sibling-MatMul merge and packed
    Q/K/V into GroupQueryAttention (on the proto). Returns (ModelProto, result, {input: why its MatMuls were not merged})."""
    import onnx_ir as ir

    from slimline.compile.fusions.gqa_lengths import lengths_from_mask
    from slimline.compile.fusions.sibling_matmul import merge_sibling_matmuls, pack_attention_inputs

    result = fuse_model(model, skip=skip, diagnose=diagnose)
    proto, rejected = ir.to_proto(model), {}
    result.steps["dropped_unused_outputs"] = drop_unused_outputs(proto)
    if decoder:
        result.steps["merged_sibling_matmuls"], rejected = merge_sibling_matmuls(proto)
        result.steps["packed_qkv_attention"] = pack_attention_inputs(proto)
        result.steps["gqa_lengths_from_mask"] = lengths_from_mask(proto)
    return proto, result, rejected


def diagnose_step(model: Any, module: Any, runner: Any) -> list[dict]:
    """The candidates ``module`` left unfused, each with its closest rule's reason (changes nothing)."""
    candidate = getattr(module, "candidate", lambda node: True)
    anchors = [n for n in model.graph if n.op_type in getattr(module, "ANCHORS", ()) and candidate(n)]
    found: list[dict] = []
    if anchors:
        tracer = Tracer()
        _run(module, runner, model, tracer)
        for anchor in anchors:
            attempt = tracer.explain(anchor)
            where = locate(anchor)
            found.append(
                {
                    "op": module.OP,
                    "where": where,
                    "layer": layer_of(where),
                    "node": anchor.name or anchor.op_type,
                    "rule": attempt.rule if attempt else None,
                    "reason": (f"{attempt.status}: {attempt.reason}" if attempt else "no rule's pattern reached this node"),
                }
            )
    return found
