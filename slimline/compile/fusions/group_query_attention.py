"""GroupQueryAttention: a decoder's attention block with rotary and KV cache in one kernel.

    q, k, v ── RotaryEmbedding(q), RotaryEmbedding(k) ── Concat(past_k|v, k|v) ── Expand(groups)
        ── MatMul(q, k^T) ── Mul(scale) ── [softcap: Div(c) Tanh Mul(c)] ── Add(causal or sliding mask)
        ── Softmax ── MatMul(v) ──
                                  ==>
    q, k, v, past_key, past_value, seqlens_k, total_seq_len, cos, sin
        ── GroupQueryAttention(num_heads, kv_num_heads, do_rotary, scale, softcap, local_window_size)
        ── out, present_key, present_value

onnxscript's rules do most of the work: ``sdpa`` recognises scaled dot-product attention, ``gqa`` the
grouped K/V with past, rotary and q/k norms (Qwen3, Gemma 3), and ``packed_qkv_for_gqa`` a packed QKV
projection. Their ``check`` rejects, with a reason, head counts that don't divide, non-causal masks
and unknown shapes.

Where they fall short, slimline adds (each was a silent wrong answer, caught by a parity check on a
tiny Gemma with its window shorter than the prompt and its logits pushed past the cap):
- **scale**: ``gqa`` drops the SDPA's scale, so a model whose scale is not 1/sqrt(head_dim) (Gemma's
  ``query_pre_attn_scalar``) got the default one. slimline's rule carries it to GQA's ``scale``.
- **sliding window**: ``gqa``'s mask pattern accepts the sliding-window mask (Mistral, Gemma 2/3,
  Phi-3) but its check never reads the window (a misnamed argument), so every layer became full
  attention. slimline's rule reads the window and sets ``local_window_size``.
- **soft-capping** (Gemma 2: ``cap * tanh(scores / cap)`` before the mask): ``sdpa`` has no pattern for
  it. slimline's ``SoftcappedSDPA`` rule matches it and GQA gets ``softcap``; one GQA rejects is
  expanded back into standard ops, never handed on without its cap.
"""

from __future__ import annotations

import functools
import math

OP = "GroupQueryAttention"
ANCHORS = ("Softmax", "SDPA")  # SDPA: onnxscript's intermediate op, left when gqa rejects it
FUSION_DOMAIN = "ai.onnxruntime._fusion"


def candidate(node) -> bool:
    """A Softmax in a graph with a KV cache (an encoder's Softmax is Attention's candidate)."""
    graph = node.graph
    return graph is not None and any("past" in (value.name or "") for value in graph.inputs)


def _scalar(value) -> float | None:
    from onnxscript.rewriter import _ir_utils

    got = _ir_utils.get_singleton_value(value) if value is not None else None
    return None if got is None else float(got)


@functools.cache
def _classes():
    """The rule classes, built on first use (onnxscript is imported only when fusing)."""
    import onnx_ir as ir
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions import gqa, sdpa

    class SoftcappedSDPA(sdpa.SDPA):
        """onnxscript's SDPA with the Gemma 2 soft-cap between the scaled scores and the mask."""

        def __init__(self) -> None:
            pattern.RewriteRuleClassBase.__init__(self, "SoftcappedSDPA")

        def pattern(self, op, query, key, value, mask, query_scale, key_scale, qk_scale, cap, cap2):  # noqa: PLR0913
            key_t = pattern.OrValue(
                [op.Transpose(key, perm=[0, 1, 3, 2]), op.Transpose(key, perm=[0, 2, 3, 1])],
                tag_var="key_format",
                tag_values=["BHSd", "BSHd"],
            )
            query = pattern.OrValue(
                [op.Mul(query, query_scale), op.Div(query, query_scale), query],
                tag_var="query_scaling",
                tag_values=["Mul", "Div", "None"],
            )
            key_t = pattern.OrValue(
                [op.Mul(key_t, key_scale), op.Div(key_t, key_scale), key_t],
                tag_var="key_scaling",
                tag_values=["Mul", "Div", "None"],
            )
            score = op.MatMul(query, key_t)
            score = pattern.OrValue(
                [op.Mul(score, qk_scale), op.Div(score, qk_scale), score],
                tag_var="qk_scaling",
                tag_values=["Mul", "Div", "None"],
            )
            capped = pattern.OrValue(  # a cap of 1 is folded to a bare Tanh by the exporter
                [op.Mul(op.Tanh(op.Div(score, cap)), cap2), op.Tanh(score)], tag_var="capping", tag_values=["cap", "one"]
            )
            capped = pattern.OrValue([op.Add(capped, mask), capped], tag_var="has_mask", tag_values=[True, False])
            weights = op.Softmax(capped, axis=-1)
            return op.MatMul(weights, value)

        def check(self, context, cap=None, cap2=None, capping="cap", **bindings):
            c1, c2 = (_scalar(cap), _scalar(cap2)) if capping == "cap" else (1.0, 1.0)
            if c1 is None or c2 is None or not math.isclose(c1, c2, rel_tol=1e-6) or c1 <= 0:
                return pattern.MatchResult().fail("soft-cap divisor and multiplier are not the same positive constant", cap)
            self._softcap = c1
            result = super().check(context, **bindings)
            if result and self._scale is None and not isinstance(bindings["query"].shape[-1], int):
                return pattern.MatchResult().fail("the head size is not static, so the scale is unknown", bindings["query"])
            return result

        def rewrite(self, op, query, key, value, mask, key_format, **_):
            args = [query, key, value] + ([mask] if mask is not None else [])
            # the scale always explicit (the default one too): a capped SDPA may be expanded back later
            scale = self._scale if self._scale is not None else 1.0 / math.sqrt(query.shape[-1])
            return op.SDPA(*args, scale=scale, softcap=self._softcap, key_format=key_format, _domain=FUSION_DOMAIN)

    class GQA(gqa.GroupQueryAttention):
        """onnxscript's gqa rule, carrying the SDPA's scale and softcap and the mask's window to GQA."""

        def check(self, context, query_BHSDh_rope=None, mask=None, **bindings):
            result = super().check(context, query_BHSDh_rope=query_BHSDh_rope, mask=mask, **bindings)
            if not result:
                return result
            sdpa_node = next((n for n, _ in query_BHSDh_rope.uses() if n.op_type == "SDPA"), None)
            attrs = sdpa_node.attributes if sdpa_node is not None else {}
            self._extra = {}
            if attrs.get("scale") is not None and attrs["scale"].value is not None:
                self._extra["scale"] = ir.AttrFloat32("scale", float(attrs["scale"].value))
            if attrs.get("softcap") is not None:
                self._extra["softcap"] = ir.AttrFloat32("softcap", float(attrs["softcap"].value))
            window = sliding_window(mask)
            if window is not None:
                if window < 1:
                    return pattern.MatchResult().fail(f"the sliding window's size {window} is not a positive constant", mask)
                # transformers keeps keys with q - window < k <= q; ORT's local_window_size of the same
                # value gives the same logits in prefill and decode (the parity check's tiny Gemma)
                self._extra["local_window_size"] = ir.AttrInt64("local_window_size", window)
            return result

        def rewrite(self, op, **bindings):
            outputs = super().rewrite(op, **bindings)
            node = outputs[0].producer()
            for name, attr in self._extra.items():
                node.attributes[name] = attr
            return outputs

    class ExpandSoftcappedSDPA(pattern.RewriteRuleClassBase):
        """An SDPA with a softcap that GQA did not take, back into standard ops (no kernel has its cap)."""

        def pattern(self, op, query, key, value):
            return op.SDPA(query, key, value, _allow_other_inputs=True, _domain=FUSION_DOMAIN, _outputs=["out"])

        def check(self, context, out=None, **_):
            node = out.producer()
            if node.attributes.get("softcap") is None:
                return pattern.MatchResult().fail("no softcap: onnxscript's own SDPA handling applies", node)
            self._node_attrs = node.attributes
            self._mask = node.inputs[3] if len(node.inputs) > 3 else None
            return True

        def rewrite(self, op, query, key, value, **_):
            attrs = self._node_attrs
            perm = [0, 1, 3, 2] if attrs["key_format"].value == "BHSd" else [0, 2, 3, 1]
            scale = attrs["scale"].value  # SoftcappedSDPA always writes it
            cap = op.Constant(value_float=float(attrs["softcap"].value))
            score = op.Mul(op.MatMul(query, op.Transpose(key, perm=perm)), op.Constant(value_float=float(scale)))
            score = op.Mul(op.Tanh(op.Div(score, cap)), cap)
            if self._mask is not None:
                score = op.Add(score, self._mask)
            return op.MatMul(op.Softmax(score, axis=-1), value)

    return SoftcappedSDPA, GQA, ExpandSoftcappedSDPA


def sliding_window(mask, limit: int = 80) -> int | None:
    """The window of a sliding-window mask, or None for a causal one: the constant W in the mask's
    ``Sub(query_position, W)`` that a key position is compared with (transformers' masking_utils
    writes ``key > query - W``; onnxscript's pattern ``key <= query - W``). Looks at most ``limit``
    nodes up the mask's cone."""
    compares = {"Greater", "GreaterOrEqual", "Less", "LessOrEqual"}
    seen, todo = set(), [mask]
    while todo and len(seen) < limit:
        value = todo.pop()
        node = value.producer() if value is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Sub" and _feeds(node.outputs[0], compares):
            size = _scalar(node.inputs[1])
            if size is not None and size == int(size):
                return int(size)
        todo.extend(node.inputs)
    return None


def _feeds(value, ops: set[str], depth: int = 3) -> bool:
    """Whether ``value`` reaches one of ``ops`` through at most ``depth`` reshaping ops."""
    for use, _ in value.uses():
        if use.op_type in ops:
            return True
        if depth and use.op_type in ("Reshape", "Unsqueeze", "Cast", "Expand") and _feeds(use.outputs[0], ops, depth - 1):
            return True
    return False


def rules() -> list:
    _, gqa_rule, _ = _classes()
    return [gqa_rule.rule()]


def sdpa_rules() -> list:
    from onnxscript.rewriter.ort_fusions.sdpa import sdpa_rules as onnxscript_sdpa

    softcapped, _, _ = _classes()
    return [softcapped.rule(), *onnxscript_sdpa.rules]


def apply(model, tracer=None) -> int:
    from onnxscript.rewriter import RewriteRuleSet
    from onnxscript.rewriter.ort_fusions.gqa_packed_qkv import fuse_qkv_gqa
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    if not any("past" in (value.name or "") for value in model.graph.inputs):
        return 0  # no KV cache: an encoder's attention is attention.py's
    if tracer is not None:
        return RewriteRuleSet(sdpa_rules()).apply_to_model(model, tracer=tracer) + RewriteRuleSet(rules()).apply_to_model(
            model, tracer=tracer
        )
    import onnx_ir.passes.common as common_passes

    RewriteRuleSet(sdpa_rules()[:1]).apply_to_model(model)  # the soft-capped form first: sdpa's would not see it
    fuse_sdpa(model, apply_shape_inference=True)
    count = RewriteRuleSet(rules()).apply_to_model(model)
    common_passes.RemoveUnusedNodesPass()(model)
    _, _, expand = _classes()
    RewriteRuleSet([expand.rule()]).apply_to_model(model)
    fuse_qkv_gqa(model)
    return count
