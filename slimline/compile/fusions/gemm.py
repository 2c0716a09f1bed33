"""Gemm into MatMul + Add (a helper rule, not a fused op).

    x2d ── Gemm(W, b) ──      ==>      x2d ── MatMul(W) ── Add(b) ──

GPT-2's Conv1D projections export as ``Reshape(x, [-1, n]) ── Gemm ── Reshape`` (torch's addmm).
onnxscript's multi-head-attention rules then drop the Reshape around the output projection and leave
a Gemm fed a 3-D tensor, which ONNX Runtime refuses to load. MatMul takes any rank, so the fused
graph stays valid; the MatMul and Add are what the int4/int8 quantizers and BiasGelu look for too.
onnxscript's own ``gemm_to_matmul_add`` only fires when it can prove the reshapes redundant, which
dynamic batch and sequence lengths prevent.
"""

from __future__ import annotations

OP = None  # produces no fused op


def rules() -> list:
    from onnxscript.rewriter import pattern

    class GemmAsMatMul(pattern.RewriteRuleClassBase):
        def pattern(self, op, a, b):
            return op.Gemm(a, b, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["out"])

        def check(self, context, a, b, out, **_):
            node = out.producer()
            attrs = node.attributes
            self._bias = node.inputs[2] if len(node.inputs) > 2 else None
            if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
                return pattern.MatchResult().fail("alpha or beta is not 1", out)
            if attrs.get_int("transA", 0):
                return pattern.MatchResult().fail("transA is set", out)
            self._trans_b = bool(attrs.get_int("transB", 0))
            return True

        def rewrite(self, op, a, b, **_):
            weight = op.Transpose(b, perm=[1, 0]) if self._trans_b else b
            product = op.MatMul(a, weight)
            return product if self._bias is None else op.Add(product, self._bias)

    return [GemmAsMatMul.rule()]
