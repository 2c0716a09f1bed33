"""SkipLayerNormalization: the residual Add (and the dense layer's bias) folded into LayerNorm.

    dense ── Add(bias) ── Add(residual) ── LayerNormalization(gamma, beta) ──
                                  ==>
    dense, residual, gamma, beta, bias ── SkipLayerNormalization ──

onnxscript's rule class, reused, with one fix: onnxscript matches the bias Add only as
``Add(MatMul, bias)`` (the dynamo exporter's order). The legacy exporter writes ``Add(bias, MatMul)``,
so on optimum-onnx's graph the bias stayed outside as 12 extra Adds. ``bias_first`` is the same
rule with that Add's operands swapped (onnxscript's ``commute()`` can't be used: the rule has an
OrValue). And ``check`` is ours: onnxscript's demands that the residual's batch and sequence
dims be provably the same symbol, but ONNX shape inference mints a new symbol at every Reshape, so it
rejected true residuals after a fused Attention. Ours requires equal ranks, equal static dims, no
broadcast dim of 1 on one side only, inputs that carry per-token data (a position-embedding table
whose leading 1 inference lost is not a residual), and the hidden size of gamma; ONNX Runtime's kernel checks the rest at run time and the stage's parity
check proves the outputs. ``check`` (onnxscript's) rejects mismatched hidden sizes and non-1-D gamma/beta.
"""

from __future__ import annotations

OP = "SkipLayerNormalization"
ANCHORS = ("LayerNormalization",)


def candidate(node) -> bool:
    """An unfused LayerNormalization over a residual sum (an Add of two computed tensors)."""
    from slimline.compile.fusions import embed_layer_norm

    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    return producer is not None and producer.op_type == "Add" and not embed_layer_norm.candidate(node)


def reads_token_data(value, limit: int = 5000) -> bool:
    """Whether ``value`` depends on a graph input's values (not only on its shape, via Shape)."""
    seen, frontier = set(), [value]
    while frontier and len(seen) < limit:
        v = frontier.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            return True
        node = v.producer()
        if node is not None and node.op_type != "Shape":
            frontier.extend(node.inputs)
    return len(seen) >= limit  # too far to tell: assume it does


def rules() -> list:
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions.skip_normalization import SkipLayerNormFusion

    class Checked(SkipLayerNormFusion):
        def check(self, op, input, skip, gamma, beta, bias, layer_norm, **_):
            result = pattern.MatchResult()
            hidden = gamma.shape[0] if gamma.shape is not None and gamma.shape.rank() == 1 else None
            if not isinstance(hidden, int):
                return result.fail("gamma is not a 1-D tensor of known size", gamma)
            for what, value in [("input", input), ("skip", skip)]:
                if value.shape is None or value.shape.rank() != 3 or value.shape[2] != hidden:
                    return result.fail(f"the {what} is not (batch, sequence, {hidden}): {value.shape}", value)
            for a, b in zip(input.shape, skip.shape, strict=True):  # ranks checked equal above
                if isinstance(a, int) and isinstance(b, int) and a != b:
                    return result.fail(f"input {input.shape} and skip {skip.shape} differ", skip)
                if (a == 1) != (b == 1):  # one side broadcasts (a (1, S, H) position embedding): not a residual
                    return result.fail(f"input {input.shape} and skip {skip.shape} broadcast, not a residual", skip)
            for what, value in [("input", input), ("skip", skip)]:
                if not reads_token_data(value):  # e.g. a (1, S, H) position-embedding lookup whose shape inference lost the 1
                    return result.fail(f"the {what} carries no per-token data (a broadcast table), not a residual", value)
            for what, value in [("beta", beta)] + ([("bias", bias)] if self._has_bias else []):
                if value.shape is None or list(value.shape) != [hidden]:
                    return result.fail(f"{what} is not ({hidden},)", value)
            if layer_norm.producer().attributes.get_int("stash_type", 1) != 1:
                return result.fail("LayerNormalization stash_type is not float32")
            return result

    class BiasFirstSkipLayerNorm(Checked):
        def pattern(self, op, input, skip, gamma, beta, bias):
            biased = op.Add(bias, input)
            skip_sum = pattern.OrValue([op.Add(skip, biased), op.Add(biased, skip)], name="skip_sum")
            normalized = op.LayerNormalization(
                skip_sum, gamma, beta, axis=-1, _allow_other_attributes=True, _outputs=["layer_norm"]
            )
            return normalized, skip_sum

    return [
        BiasFirstSkipLayerNorm.rule("SkipLayerNormPreBias_bias_first", has_bias=True, bias_pre_add=True),
        Checked.rule("SkipLayerNormPreBias", has_bias=True, bias_pre_add=True),
        Checked.rule("SkipLayerNormBias", has_bias=True, bias_pre_add=False),
        Checked.rule("SkipLayerNorm", has_bias=False),
    ]
