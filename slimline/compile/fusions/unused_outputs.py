"""Unname optional outputs nobody reads, so the kernels skip computing and writing them.

onnxscript's norm fusions name every output of SkipSimplifiedLayerNormalization (mean and inverse
standard deviation included); ONNX Runtime then allocates and fills them on every run. On SmolLM2
the 60 skip norms took 0.43 ms of a decode step with them and 0.37 ms without.
"""

from __future__ import annotations

from typing import Any

# fused ops whose outputs after the first are optional statistics or side results
OPTIONAL_OUTPUTS = {
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
}


def drop_unused_outputs(model: Any) -> int:
    """Unname the optional outputs of ``model`` (a ModelProto, in place) that no node or graph output reads; the count."""
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dropped = 0
    for node in model.graph.node:
        if node.op_type not in OPTIONAL_OUTPUTS:
            continue
        outputs = list(node.output)
        for i in range(1, len(outputs)):
            if outputs[i] and outputs[i] not in read:
                outputs[i] = ""
                dropped += 1
        while len(outputs) > 1 and not outputs[-1]:
            outputs.pop()
        del node.output[:]
        node.output.extend(outputs)
    return dropped
