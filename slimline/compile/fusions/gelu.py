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

    return [*erf_rules.rules, *gelu_rules.rules, *bias_gelu_rules.rules]
