"""Gelu and BiasGelu: the erf (or tanh) GELU formula, and the dense layer's bias, in one kernel.

    x ── Add(bias) ─┬────────────────────────────── Mul ── Mul(0.5) ──
                    └─ Div(sqrt 2) ── Erf ── Add(1) ─┘
                                  ==>
    x, bias ── BiasGelu ──        (Gelu when there is no constant bias to absorb)

onnxscript's rules, reused as shipped: ``erfgelu`` and ``gelu`` recognise the formula (several
association orders; the tanh form becomes FastGelu's math in Gelu(approximate=tanh)), then
``bias_gelu`` absorbs a 1-D bias. ``OP`` is BiasGelu; a Gelu that kept its bias outside is counted
as Gelu in the report.
"""

from __future__ import annotations

OP = "BiasGelu"
ANCHORS = ("Erf", "Tanh")


def candidate(node) -> bool:
    """An Erf, or a Tanh inside the tanh formula (1 + tanh(...)); not a pooler's plain Tanh."""
    return node.op_type == "Erf" or any(use.op_type == "Add" for use, _ in node.outputs[0].uses())


def rules() -> list:
    from onnxscript.rewriter.ort_fusions.bias_gelu import bias_gelu_rules
    from onnxscript.rewriter.ort_fusions.erfgelu import rules as erf_rules
    from onnxscript.rewriter.ort_fusions.gelu import gelu_rules

    return [*erf_rules.rules, *gelu_rules.rules, *_tanh_half_first(), *bias_gelu_rules.rules]


def apply(model, tracer=None) -> int:
    """onnxscript's rules; GPT-2's form (32 operand orders) only where a Pow is left for it to match."""
    from onnxscript.rewriter import RewriteRuleSet
    from onnxscript.rewriter.ort_fusions.bias_gelu import bias_gelu_rules
    from onnxscript.rewriter.ort_fusions.erfgelu import rules as erf_rules
    from onnxscript.rewriter.ort_fusions.gelu import gelu_rules

    count = RewriteRuleSet([*erf_rules.rules, *gelu_rules.rules]).apply_to_model(model, tracer=tracer)
    if any(node.op_type == "Pow" for node in model.graph):
        count += RewriteRuleSet(_tanh_half_first()).apply_to_model(model, tracer=tracer)
    return count + RewriteRuleSet(bias_gelu_rules.rules).apply_to_model(model, tracer=tracer)


def _tanh_half_first() -> list:
    """slimline's own: the tanh GELU as GPT-2's ``gelu_new`` writes it, ``(0.5 * x) * (1 + tanh(...))``
    with ``x ** 3 * 0.044715``. onnxscript's rule has ``x * (0.5 * (1 + tanh(...)))`` only, and its
    operands in one order, so GPT-2's FFN kept eight elementwise ops per layer."""
    import math

    import numpy as np
    from onnxscript.rewriter import _ir_utils, pattern

    constants = {"half": 0.5, "one": 1.0, "three": 3.0, "cubic": 0.044715, "root": math.sqrt(2.0 / math.pi)}

    class GeluTanhHalfFirst(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, half, one, three, cubic, root):
            inner = op.Mul(root, op.Add(x, op.Mul(cubic, op.Pow(x, three))))
            return op.Mul(op.Mul(half, x), op.Add(op.Tanh(inner), one))

        def check(self, context, **bindings):
            for name, want in constants.items():
                got = _ir_utils.get_numpy_value(bindings[name])
                if got is None or got.size != 1 or not np.isclose(float(got.reshape(-1)[0]), want, rtol=1e-4):
                    return pattern.MatchResult().fail(f"the constant `{name}` is not {want:.6g}", bindings[name])
            return True

        def rewrite(self, op, x, **_):
            return op.FastGelu(x, _domain="com.microsoft")

    return list(GeluTanhHalfFirst.rule().commute())
