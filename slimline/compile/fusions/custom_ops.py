"""``compile.fuse: {custom_ops: true}``: hand fused nodes to slimline's own kernels (``slimline.ops``).

A pass over the fused graph, after the rules: each com.microsoft SkipSimplifiedLayerNormalization
without bias, whose mean/inv-std outputs nothing reads, becomes ``ai.slimline.SkipRMSNorm`` with the
same inputs, epsilon, name and metadata (its sum output kept where something reads it). Same maths,
but the mean square is accumulated in fp32 on every provider, so ``quantize.fp16`` can leave the norm
in fp16 where ONNX Runtime's CUDA kernel would overflow (slimline.ops says why). Nodes it leaves alone
are reported with the reason.
"""

from __future__ import annotations

from typing import Any

from slimline.ops import DOMAIN

SKIP_NORM = "SkipSimplifiedLayerNormalization"
EPSILON_DEFAULT = 1e-12  # com.microsoft's default for the Skip*LayerNormalization ops


def to_custom_ops(model: Any) -> tuple[dict[str, int], dict[str, str]]:
    """Rewrite ``model`` (a ModelProto) in place; returns (counts per custom op, {node: why not})."""
    import onnx

    graph = model.graph
    read = {i for n in graph.node for i in n.input if i} | {o.name for o in graph.output}
    counts: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for index, node in enumerate(list(graph.node)):
        if node.op_type != SKIP_NORM or node.domain != "com.microsoft":
            continue
        inputs = list(node.input)
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if len(inputs) > 3 and inputs[3]:
            skipped[node.name] = "has a bias input (SkipRMSNorm takes none)"
            continue
        if any(outputs[i] and outputs[i] in read for i in (1, 2)):
            skipped[node.name] = "its mean / inverse-std-dev output is read"
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), EPSILON_DEFAULT)
        total = outputs[3] if outputs[3] in read else ""
        new = onnx.helper.make_node("SkipRMSNorm", inputs[:3], [outputs[0], total], name=node.name, domain=DOMAIN, epsilon=eps)
        new.metadata_props.extend(node.metadata_props)
        graph.node.remove(node)
        graph.node.insert(index, new)
        counts["SkipRMSNorm"] = counts.get("SkipRMSNorm", 0) + 1
    if counts and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return counts, skipped
