"""QuickGelu: GELU's sigmoid approximation (CLIP's ``quick_gelu``), ``x * sigmoid(alpha * x)``, in one kernel.

    x ─┬── Mul(alpha) ── Sigmoid ──┐
       └─────────────────────────── Mul ──
                                  ==>
    x ── QuickGelu(alpha) ──

slimline's own rule (onnxscript has none). ``check`` takes a scalar constant ``alpha`` (1.702 in CLIP)
and rejects ``alpha = 1``: ``x * sigmoid(x)`` is SiLU, the activation of Llama-style MLPs, which the
same kernel computes; whether it pays there is not measured yet, so those graphs are left as they are.
"""

from __future__ import annotations

OP = "QuickGelu"
ANCHORS = ("Sigmoid",)


def candidate(node) -> bool:
    """A Sigmoid of a product by a constant (not SiLU's plain Sigmoid of x)."""
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    return (
        producer is not None
        and producer.op_type == "Mul"
        and any(i is not None and i.const_value is not None for i in producer.inputs)
    )


def rules() -> list:
    from onnxscript.rewriter import _ir_utils, pattern

    class QuickGelu(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, alpha):
            return op.Mul(x, op.Sigmoid(op.Mul(x, alpha)))

        def check(self, context, x, alpha, **_):
            result = pattern.MatchResult()
            value = _ir_utils.get_numpy_value(alpha)
            if value is None:
                return result.fail("alpha is not a constant", alpha)
            if value.size != 1:
                return result.fail(f"alpha has {value.size} values, not one", alpha)
            if float(value.reshape(-1)[0]) == 1.0:
                return result.fail("alpha is 1: x * sigmoid(x) is SiLU, left unfused (not measured as QuickGelu yet)", alpha)
            return result

        def rewrite(self, op, x, alpha):
            out = op.QuickGelu(x, alpha=float(_ir_utils.get_numpy_value(alpha).reshape(-1)[0]), _domain="com.microsoft")
            out.shape, out.type = x.shape, x.type  # contrib ops get no inferred shape
            return out

    return list(QuickGelu.rule("quick_gelu").commute())
