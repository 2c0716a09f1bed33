"""SkipLayerNormalization: the residual Add (and the dense layer's bias) folded into LayerNorm.

    dense ── Add(bias) ── Add(residual) ── LayerNormalization(gamma, beta) ──
                                  ==>
    dense, residual, gamma, beta, bias ── SkipLayerNormalization ──

onnxscript's rule class, reused, with one fix: onnxscript matches the bias Add only as
``Add(MatMul, bias)`` (the dynamo exporter's order). The legacy exporter writes ``Add(bias, MatMul)``,
so on optimum-onnx's graph the bias stayed outside as 12 extra Adds. ``bias_first`` is the same
rule with that Add's operands swapped (onnxscript's ``commute()`` can't be used: the rule has an
OrValue). ``check`` (onnxscript's) rejects mismatched hidden sizes and non-1-D gamma/beta.
"""

from __future__ import annotations

OP = "SkipLayerNormalization"
ANCHORS = ("LayerNormalization",)


def candidate(node) -> bool:
    """An unfused LayerNormalization over a residual sum (an Add of two computed tensors)."""
    from slimline.compile.fusions import embed_layer_norm

    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    return producer is not None and producer.op_type == "Add" and not embed_layer_norm.candidate(node)


def rules() -> list:
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions.skip_normalization import SkipLayerNormFusion, skip_layer_normalization_ruleset

    class BiasFirstSkipLayerNorm(SkipLayerNormFusion):
        def pattern(self, op, input, skip, gamma, beta, bias):
            biased = op.Add(bias, input)
            skip_sum = pattern.OrValue([op.Add(skip, biased), op.Add(biased, skip)], name="skip_sum")
            normalized = op.LayerNormalization(
                skip_sum, gamma, beta, axis=-1, _allow_other_attributes=True, _outputs=["layer_norm"]
            )
            return normalized, skip_sum

    return [
        BiasFirstSkipLayerNorm.rule("SkipLayerNormPreBias_bias_first", has_bias=True, bias_pre_add=True),
        *skip_layer_normalization_ruleset.rules,
    ]
