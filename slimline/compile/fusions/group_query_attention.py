"""GroupQueryAttention: a Llama attention block with rotary and KV cache in one kernel.

    q, k, v ── RotaryEmbedding(q), RotaryEmbedding(k) ── Concat(past_k|v, k|v) ── Expand(groups)
        ── MatMul(q, k^T) ── Mul(scale) ── Add(causal mask) ── Softmax ── MatMul(v) ──
                                  ==>
    q, k, v, past_key, past_value, seqlens_k, total_seq_len, cos, sin
        ── GroupQueryAttention(num_heads, kv_num_heads, do_rotary) ── out, present_key, present_value

onnxscript's rules, reused as shipped: ``sdpa`` recognises scaled dot-product attention, ``gqa``
the grouped K/V with past and rotary, and ``packed_qkv_for_gqa`` a packed QKV projection. Their
``check`` rejects, with a reason, head counts that don't divide, non-causal masks and unknown shapes.
"""

from __future__ import annotations

OP = "GroupQueryAttention"
ANCHORS = ("Softmax", "SDPA")  # SDPA: onnxscript's intermediate op, left when gqa rejects it


def candidate(node) -> bool:
    """A Softmax in a graph with a KV cache (an encoder's Softmax is Attention's candidate)."""
    graph = node.graph
    return graph is not None and any("past" in (value.name or "") for value in graph.inputs)


def rules() -> list:
    from onnxscript.rewriter.ort_fusions.gqa import gqa_rules

    return list(gqa_rules.rules)


def apply(model, tracer=None) -> int:
    from onnxscript.rewriter import RewriteRuleSet
    from onnxscript.rewriter.ort_fusions.gqa_packed_qkv import fuse_qkv_gqa
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa, sdpa_rules

    if not any("past" in (value.name or "") for value in model.graph.inputs):
        return 0  # no KV cache: an encoder's attention is attention.py's
    if tracer is not None:
        return sdpa_rules.apply_to_model(model, tracer=tracer) + RewriteRuleSet(rules()).apply_to_model(model, tracer=tracer)
    fuse_sdpa(model, apply_shape_inference=True)
    count = RewriteRuleSet(rules()).apply_to_model(model)
    fuse_qkv_gqa(model)
    return count
