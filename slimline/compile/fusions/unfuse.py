"""The unfused forms ``compile.tune`` times a fused op against, on a ModelProto in place.

    SkipLayerNormalization(x, skip, gamma, beta, bias)      ==>  Add(x, skip) ── Add(bias) ── LayerNormalization(gamma, beta)
    SkipSimplifiedLayerNormalization(x, skip, gamma, bias)  ==>  Add(x, skip) ── Add(bias) ── SimplifiedLayerNormalization(gamma)
    BiasGelu(x, bias)                                       ==>  Add(x, bias) ── Gelu (com.microsoft, the same erf form)

Nodes whose mean / inverse-std outputs are read are left alone (the plain norm ops don't give them
in the same form). The skip sum, when a later node reads it (output 3), keeps its name.
"""

from __future__ import annotations

from typing import Any

NORM_OF = {"SkipLayerNormalization": "LayerNormalization", "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization"}


def unfuse(model: Any, op_type: str) -> int:
    """Rewrite every ``op_type`` node of ``model`` (in place) into Add (+ Add bias) + its norm; the count."""
    from onnx import helper

    read = ({i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}) - {""}
    simplified = op_type == "SkipSimplifiedLayerNormalization"
    nodes, count = [], 0
    for n in model.graph.node:
        outs = list(n.output) + [""] * (4 - len(n.output))
        if n.op_type != op_type or n.domain != "com.microsoft" or outs[1] in read or outs[2] in read:
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        ins = list(n.input) + [""] * (5 - len(n.input))
        bias = ins[3] if simplified else ins[4]
        total = outs[3] or f"{n.name or n.output[0]}/skip_sum"
        first = f"{total}/partial" if bias else total
        nodes.append(helper.make_node("Add", [ins[0], ins[1]], [first], name=f"{n.name}/add_skip"))
        if bias:
            nodes.append(helper.make_node("Add", [first, bias], [total], name=f"{n.name}/add_bias"))
        norm_in = [total, ins[2]] if simplified else [total, ins[2], ins[3]] if ins[3] else [total, ins[2]]
        nodes.append(
            helper.make_node(
                NORM_OF[op_type], norm_in, [outs[0]], name=f"{n.name}/norm", axis=-1, epsilon=attrs.get("epsilon", 1e-12)
            )
        )
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def skip_layer_norm(model: Any) -> int:
    return unfuse(model, "SkipLayerNormalization")


def skip_simplified_layer_norm(model: Any) -> int:
    return unfuse(model, "SkipSimplifiedLayerNormalization")


def bias_gelu(model: Any) -> int:
    """Rewrite every com.microsoft BiasGelu of ``model`` (in place) into Add + com.microsoft Gelu; the count.
    ONNX Runtime 1.32's CPU Gelu runs faster than its BiasGelu on MiniLM's FFN (compile.tune measures it)."""
    from onnx import helper

    nodes, count = [], 0
    for n in model.graph.node:
        if n.op_type != "BiasGelu" or n.domain != "com.microsoft" or len(n.input) < 2 or not n.input[1]:
            nodes.append(n)
            continue
        pre = f"{n.name or n.output[0]}/biased"
        nodes.append(helper.make_node("Add", [n.input[0], n.input[1]], [pre], name=f"{n.name}/add_bias"))
        nodes.append(helper.make_node("Gelu", [pre], list(n.output), name=f"{n.name}/gelu", domain="com.microsoft"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count
