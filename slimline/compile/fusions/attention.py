"""Attention: a BERT-family self-attention block in one com.microsoft Attention kernel.

    x ─┬─ MatMul(Wq) ─ Add(bq) ─ Reshape ─ Transpose(0,2,1,3) ─ [Mul(s)] ──┐
       ├─ MatMul(Wk) ─ Add(bk) ─ Reshape ─ Transpose(0,2,3,1) ─ [Mul(s)] ─ MatMul ─ [Div|Mul(c)]
       │                                                                           │
       │         attention_mask ── (Unsqueeze, Expand, Cast, Sub, Where) ───────── Add
       │                                                                           │
       └─ MatMul(Wv) ─ Add(bv) ─ Reshape ─ Transpose(0,2,1,3) ─────────── MatMul ─ Softmax
                                                                             │
                                              Transpose(0,2,1,3) ─ Reshape ─ out
                                                        ==>
    x, [Wq|Wk|Wv], [bq|bk|bv], Cast(int32)(attention_mask) ── Attention(num_heads, scale) ── out

Two sources of rules:

- slimline's own ``bert_self_attention`` for the legacy (TorchScript) exporter that optimum-onnx
  uses: onnxscript's attention rules expect the dynamo exporter's graph and miss this one. The
  three scale placements transformers has used (sqrt of the scale on both Q and K; scores divided
  by sqrt(d); scores multiplied by 1/sqrt(d)) and attention without a mask all match, and so does a
  relative-position bias added before the mask (MPNet), passed on as Attention's ``attention_bias``.
- onnxscript's SDPA -> MultiHeadAttention -> Attention chain for the dynamo exporter's graph,
  followed by slimline's ``attention_mask_index`` rule. onnxscript passes the additive float mask
  as ``attention_bias``; ONNX Runtime's int8 quantizer (QAttention) has no such input, so we
  replace it with the 2-D ``mask_index`` the additive mask was computed from, as ONNX Runtime's
  own optimizer does. This also lets the kernel skip the (B, 1, S, S) float mask.

``check`` rejects, with a reason: weights or biases that are not constants, a head count or head
size the shapes don't give, a non-scalar scale, a Softmax not over the last axis, and an additive
mask that is not computed from one 2-D attention_mask input (a causal or relative-position bias).
"""

from __future__ import annotations

import itertools

import numpy as np

OP = "Attention"
ANCHORS = ("Softmax", "SDPA")  # SDPA: onnxscript's intermediate op, left when the MHA chain rejects it
_NAMES = itertools.count()
MASK_OPS = {
    "Unsqueeze",
    "Expand",
    "Cast",
    "Sub",
    "Mul",
    "Where",
    "Reshape",
    "Concat",
    "Shape",
    "Gather",
    "ConstantOfShape",
    "Equal",
    "Slice",
    "Squeeze",
    "Not",
    "Constant",
}


def mask_source(bias):
    """The 2-D integer graph input an additive attention mask is computed from, or a reason string."""
    seen, frontier, sources = set(), [bias], []
    while frontier:
        value = frontier.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_input():
            sources.append(value)
            continue
        node = value.producer()
        if node is None:
            continue  # a constant
        if node.op_type == "Shape":
            continue  # reads only the shape (e.g. of input_ids): not a data dependency
        if node.op_type not in MASK_OPS:
            return f"the additive mask is computed with {node.op_type} (not a padding mask)"
        frontier.extend(node.inputs)
    if len(sources) != 1:
        return f"the additive mask depends on {len(sources)} graph inputs, not one attention_mask"
    source = sources[0]
    if source.shape is None or source.shape.rank() != 2:
        return f"the mask input `{source.name}` is not 2-D (batch, sequence)"
    return source


def rules(position_bias: bool | None = None) -> list:
    """slimline's attention rules, then the mask rewrite (last). ``position_bias``: only the variants
    with (True) or without (False) MPNet's position-bias Add; None: both."""
    from onnxscript.rewriter import _ir_utils, pattern

    class BertSelfAttention(pattern.RewriteRuleClassBase):
        def __init__(self, name, *, scale_mode: str, has_mask: bool, has_position_bias: bool = False):
            # remove_nodes=False: eager-attention exports (ELECTRA, BERT with attn_implementation="eager")
            # read the context's shape with Shape() for the output Reshape, a second use that would block
            # the rewrite. The replaced block is left dead and removed right after (see apply()).
            super().__init__(name, remove_nodes=False)
            self.scale_mode, self.has_mask = scale_mode, has_mask  # scale_mode: "qk", "div", "mul"
            self.has_position_bias = has_position_bias  # MPNet: a relative-position bias added before the mask

        def pattern(self, op, x, wq, bq, wk, bk, wv, bv, sq, sk, sv, so, scale, bias, position_bias):
            def head(w, b, shape, perm):
                return op.Transpose(op.Reshape(op.Add(op.MatMul(x, w), b), shape, _allow_other_attributes=True), perm=perm)

            q = head(wq, bq, sq, [0, 2, 1, 3])
            k = head(wk, bk, sk, [0, 2, 3, 1])
            v = head(wv, bv, sv, [0, 2, 1, 3])
            if self.scale_mode == "qk":
                scores = op.MatMul(op.Mul(q, scale), op.Mul(k, scale))
            else:
                raw = op.MatMul(q, k)
                scores = op.Div(raw, scale) if self.scale_mode == "div" else op.Mul(raw, scale)
            if self.has_position_bias:
                scores = op.Add(scores, position_bias)
            if self.has_mask:
                scores = op.Add(scores, bias)
            probs = op.Softmax(scores, _allow_other_attributes=True, _outputs=["probs"])
            context = op.Transpose(op.MatMul(probs, v, _outputs=["ctx_out"]), perm=[0, 2, 1, 3])
            return op.Reshape(context, so, _allow_other_attributes=True, _outputs=["out"])

        def _scale(self, scale) -> float | None:
            value = _ir_utils.get_numpy_value(scale)
            if value is None or value.size != 1:
                return None
            s = float(value.reshape(-1)[0])
            return s * s if self.scale_mode == "qk" else 1.0 / s if self.scale_mode == "div" else s

        def check(self, context, x, wq, bq, wk, bk, wv, bv, scale, probs, ctx_out, bias=None, position_bias=None, **_):
            result = pattern.MatchResult()
            if x.shape is None or x.shape.rank() != 3:
                return result.fail("the attention input is not (batch, sequence, hidden)", x)
            for what, value, rank in [("Wq", wq, 2), ("Wk", wk, 2), ("Wv", wv, 2), ("bq", bq, 1), ("bk", bk, 1), ("bv", bv, 1)]:
                if value.const_value is None or value.shape is None or value.shape.rank() != rank:
                    return result.fail(f"{what} is not a constant {rank}-D tensor", value)
            ctx = ctx_out
            if ctx.shape is None or ctx.shape.rank() != 4 or not all(isinstance(ctx.shape[i], int) for i in (1, 3)):
                return result.fail("the head count and head size are not static in the shapes", ctx)
            heads, head_size = ctx.shape[1], ctx.shape[3]
            if heads * head_size != wq.shape[1] or wq.shape[1] != wk.shape[1]:
                return result.fail(f"{heads} heads x {head_size} != the projection width {wq.shape[1]}", wq)
            if self._scale(scale) is None:
                return result.fail("the attention scale is not a constant scalar", scale)
            axis = probs.producer().attributes.get_int("axis", -1)
            if axis not in (-1, 3):
                return result.fail(f"Softmax over axis {axis}, not the key axis", probs)
            if self.has_mask:
                source = mask_source(bias)
                if isinstance(source, str):
                    return result.fail(source, bias)
            if position_bias is not None:
                shape = position_bias.shape
                if shape is None or shape.rank() != 4 or shape[1] != heads:
                    return result.fail(f"the position bias is not (batch or 1, {heads} heads, sequence, sequence)", position_bias)
                if not isinstance(mask_source(position_bias), str):
                    return result.fail("the second additive term is a padding mask, not a position bias", position_bias)
            self._heads = heads
            return result

        def rewrite(self, op, x, wq, bq, wk, bk, wv, bv, scale, out, bias=None, position_bias=None, **_):
            import onnx_ir as ir

            # unique names: an optimizer may have merged equal biases (zeros) into one shared value
            name = bq.name or ""
            base = name.rsplit(".query", 1)[0] if ".query" in name else "attention"
            base = f"{base}.{next(_NAMES)}"
            w = np.concatenate([_ir_utils.get_numpy_value(t) for t in (wq, wk, wv)], axis=1)
            b = np.concatenate([_ir_utils.get_numpy_value(t) for t in (bq, bk, bv)])
            w_value = op.initializer(ir.tensor(w, name=f"{base}.qkv.weight"))
            b_value = op.initializer(ir.tensor(b, name=f"{base}.qkv.bias"))
            inputs = [x, w_value, b_value]
            if bias is not None:
                inputs.append(op.Cast(mask_source(bias), to=6))
            if position_bias is not None:  # Attention's attention_bias (input 5), after mask_index and past
                inputs += [None] * (4 - len(inputs)) + [None, position_bias]
            fused = op.Attention(*inputs, num_heads=self._heads, scale=self._scale(scale), _domain="com.microsoft")
            # contrib ops get no inferred shape, and later rules need one: (batch, sequence) of the input
            fused.shape, fused.type = ir.Shape([x.shape[0], x.shape[1], wv.shape[1]]), out.type
            return fused

    class AttentionMaskIndex(pattern.RewriteRuleClassBase):
        """Attention(x, W, b, -, -, additive mask) -> Attention(x, W, b, int32 attention_mask)."""

        def pattern(self, op, x, w, b, bias):
            return op.Attention(
                x,
                w,
                b,
                None,
                None,
                bias,
                _domain="com.microsoft",
                _allow_other_attributes=True,
                _allow_other_inputs=True,
                _outputs=["out"],
            )

        def check(self, context, bias, out, **_):
            result = pattern.MatchResult()
            if any(value is not None for value in out.producer().inputs[6:]):
                return result.fail("the Attention node has a past-sequence input; mask_index would change its meaning", out)
            source = mask_source(bias)
            if isinstance(source, str):
                return result.fail(source, bias)
            return result

        def rewrite(self, op, x, w, b, bias, out, **_):
            attrs = {k: v.value for k, v in out.producer().attributes.items()}
            return op.Attention(x, w, b, op.Cast(mask_source(bias), to=6), _domain="com.microsoft", **attrs)

    own = [
        rule
        for mode in ("qk", "div", "mul")
        for has_mask in (True, False)
        for has_position_bias in ((False, True) if position_bias is None else (position_bias,))
        for rule in BertSelfAttention.rule(
            f"bert_self_attention_{mode}{'' if has_mask else '_nomask'}{'_position_bias' if has_position_bias else ''}",
            scale_mode=mode,
            has_mask=has_mask,
            has_position_bias=has_position_bias,
        ).commute()
    ]
    return own + [AttentionMaskIndex.rule("attention_mask_index")]


def apply(model, tracer=None) -> int:
    """slimline's rule for the legacy exporter's graph, then the mask rewrite (a tracer only records)."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.rewriter import RewriteRuleSet
    from onnxscript.rewriter.ort_fusions.sdpa import sdpa_rules

    own = rules(position_bias=False)
    count = RewriteRuleSet(own[:-1]).apply_to_model(model, tracer=tracer)
    if count:
        common_passes.RemoveUnusedNodesPass()(model)  # the replaced blocks (the rule keeps them, see above)
    if any(node.op_type == "Softmax" for node in model.graph):  # left unmatched: try MPNet's position-bias form
        biased = RewriteRuleSet(rules(position_bias=True)[:-1]).apply_to_model(model, tracer=tracer)
        if biased:
            common_passes.RemoveUnusedNodesPass()(model)
        count += biased
    if tracer is not None:
        sdpa_rules.apply_to_model(model, tracer=tracer)
    RewriteRuleSet(own[-1:]).apply_to_model(model, tracer=tracer)
    return count


def apply_chain(model) -> int:
    """onnxscript's SDPA -> MHA -> Attention chain (after GroupQueryAttention has taken decoders'),
    then the mask rewrite. Returns the Attention nodes it produced."""
    from onnxscript.rewriter import RewriteRuleSet
    from onnxscript.rewriter.ort_fusions.attention import fuse_attention
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

    fuse_sdpa(model, apply_shape_inference=True)
    count = 0
    if fuse_mha1(model) + fuse_mha2(model):
        fuse_mha_scale(model)
        fuse_mha_bias(model)
        count = fuse_attention(model)
    replace_sdpa_by_mha(model)
    RewriteRuleSet(rules()[-1:]).apply_to_model(model)
    return count
