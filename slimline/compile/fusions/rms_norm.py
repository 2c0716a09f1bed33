"""SimplifiedLayerNormalization: Llama's RMSNorm in one kernel.

    x ── Pow(2) ── ReduceMean ── Add(eps) ── Sqrt ── Reciprocal ── Mul(x) ── Mul(gamma) ──
                                  ==>
    x, gamma ── SimplifiedLayerNormalization ──

onnxscript's rules, reused as shipped (they also take the Cast-to-float32-and-back that HF's
LlamaRMSNorm exports). ORT registers this op in the default ONNX domain, by history.
"""

from __future__ import annotations

OP = "SimplifiedLayerNormalization"
ANCHORS = ("ReduceMean",)


def rules() -> list:
    from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_rules

    return list(rms_normalization_rules)
