"""SkipSimplifiedLayerNormalization: the residual Add folded into RMSNorm (second output = the sum).

    attn_out ── Add(residual) ─┬── SimplifiedLayerNormalization(gamma) ── next layer
                               └── (the residual stream, used again two ops later)
                                  ==>
    attn_out, residual, gamma ── SkipSimplifiedLayerNormalization ──┬── normed
                                                                    └── sum

onnxscript's rules, reused as shipped; they must run after ``rms_norm``.
"""

from __future__ import annotations

OP = "SkipSimplifiedLayerNormalization"
ANCHORS = ("SimplifiedLayerNormalization",)


def candidate(node) -> bool:
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    return producer is not None and producer.op_type == "Add"


def rules() -> list:
    from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

    return list(skip_rms_normalization_ruleset.rules)
