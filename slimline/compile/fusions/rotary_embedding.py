"""RotaryEmbedding: rotate-half RoPE on Q and K, with the cos/sin tables precomputed.

    x ─┬─ Mul(cos) ──────────────────────────────────── Add ──
       └─ Split ── (Neg(x2), x1) ── Concat ── Mul(sin) ──┘
                                  ==>
    x, position_ids, cos_cache, sin_cache ── RotaryEmbedding ──

onnxscript's rules, reused as shipped: ``rotary_embedding`` finds the rotation, ``cos_sin_cache``
replaces the per-call cos/sin computation (from inv_freq and the positions) with constant tables,
and ``partial_rotary_embedding`` covers models that rotate only part of each head. In a decoder the
RotaryEmbedding nodes are then absorbed by GroupQueryAttention (which rotates internally), so a
fully fused Llama graph shows 0 RotaryEmbedding and one GroupQueryAttention per layer.
"""

from __future__ import annotations

OP = "RotaryEmbedding"
ANCHORS = ("Neg",)


def rules() -> list:
    from onnxscript.rewriter.ort_fusions.rotary_embedding import rotary_embedding_rules

    return list(rotary_embedding_rules.rules)


def apply(model, tracer=None) -> int:
    import onnx_ir.passes.common as common_passes
    from onnxscript.rewriter import RewriteRuleSet
    from onnxscript.rewriter.ort_fusions.cos_sin_cache import cos_sin_cache_rules
    from onnxscript.rewriter.ort_fusions.rotary_embedding import partial_embedding_rules

    count = RewriteRuleSet(rules()).apply_to_model(model, tracer=tracer)
    if tracer is None:
        cos_sin_cache_rules.apply_to_model(model)
        common_passes.CommonSubexpressionEliminationPass()(model)
        count += partial_embedding_rules.apply_to_model(model)
    return count
