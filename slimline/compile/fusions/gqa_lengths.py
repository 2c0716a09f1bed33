"""GroupQueryAttention's sequence lengths from ``attention_mask``, the way onnxruntime-genai's graphs
take them, instead of from ``position_ids``.

onnxscript's GQA rule derives both length inputs from the positions:

    seqlens_k             = Cast<int32>(ReduceMax(position_ids, axis=1))          # per row
    total_sequence_length = ReduceMax(seqlens_k) + 1                             # a device tensor
    rotary cache          = Range(0, ReduceMax(position_ids) + 1) ...

This rule rewires them to the mask:

    seqlens_k             = Cast<int32>(ReduceSum(attention_mask, axis=1) - 1)    # per row
    total_sequence_length = Cast<int32>(Shape(attention_mask)[1])                # a shape: on the host
    rotary cache          = Range(0, Shape(attention_mask)[1]) ...

For a batch of whole rows (mask all ones, positions 0..n-1) the values are the same. Two things change:

- Rows of different lengths become possible. Right-padded prompts are marked in the mask, and each
  row's keys and values then land at its own length in the cache.
- The total length comes from a shape. ONNX Runtime's CUDA kernel reads that input on the host, and
  a shape is computed there, without a device reduction and copy.
"""

from __future__ import annotations

from typing import Any

from slimline.compile.fusions.sibling_matmul import drop_unread_initializers

PREFIX = "slimline_mask"


def _producers(model: Any) -> dict[str, Any]:
    return {o: n for n in model.graph.node for o in n.output if o}


def _reads_position_max(name: str, producers: dict[str, Any]) -> bool:
    """Whether ``name`` is ``ReduceMax(position_ids) + 1`` (all axes): the rotary cache's length."""
    add = producers.get(name)
    if add is None or add.op_type != "Add":
        return False
    for operand in add.input:
        node = producers.get(operand)
        if node is not None and node.op_type == "ReduceMax" and list(node.input[:1]) == ["position_ids"] and len(node.input) == 1:
            return True
    return False


def lengths_from_mask(model: Any) -> int:
    """Rewire every GroupQueryAttention's ``seqlens_k`` / ``total_sequence_length`` (and the rotary
    cache's length) to ``attention_mask``. Returns the number of attention nodes rewired; 0 when the
    graph has no ``attention_mask`` input or no GroupQueryAttention."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if "attention_mask" not in {i.name for i in model.graph.input}:
        return 0
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" and len(n.input) > 6]
    if not gqa:
        return 0
    p = PREFIX
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], np.int64), f"{p}_axis1"),
            numpy_helper.from_array(np.array(1, np.int64), f"{p}_one"),
            numpy_helper.from_array(np.array([0], np.int64), f"{p}_axis0"),
        ]
    )
    new = [
        helper.make_node("ReduceSum", ["attention_mask", f"{p}_axis1"], [f"{p}_sum"], keepdims=0, name=f"{p}_sum"),
        helper.make_node("Sub", [f"{p}_sum", f"{p}_one"], [f"{p}_sum_minus_one"], name=f"{p}_sub"),
        helper.make_node("Cast", [f"{p}_sum_minus_one"], [f"{p}_seqlens_k"], to=TensorProto.INT32, name=f"{p}_seqlens_k"),
        helper.make_node("Shape", ["attention_mask"], [f"{p}_total"], start=1, end=2, name=f"{p}_shape"),
        helper.make_node("Cast", [f"{p}_total"], [f"{p}_total_seq_len"], to=TensorProto.INT32, name=f"{p}_total_seq_len"),
        helper.make_node("Squeeze", [f"{p}_total", f"{p}_axis0"], [f"{p}_total_scalar"], name=f"{p}_total_scalar"),
    ]
    for node in gqa:
        node.input[5], node.input[6] = f"{p}_seqlens_k", f"{p}_total_seq_len"
    producers = _producers(model)
    for node in model.graph.node:
        if node.op_type == "Range" and _reads_position_max(node.input[1], producers):
            node.input[1] = f"{p}_total_scalar"
    nodes = new + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    remove_dead_nodes(model)
    return len(gqa)


def remove_dead_nodes(model: Any) -> int:
    """Drop nodes (and initializers) whose outputs nothing reads any more; returns the nodes dropped."""
    outputs = {o.name for o in model.graph.output}
    before = len(model.graph.node)
    while True:
        read = {i for n in model.graph.node for i in n.input} | outputs
        keep = [n for n in model.graph.node if any(o in read for o in n.output if o)]
        if len(keep) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(keep)
    drop_unread_initializers(model)
    return before - len(model.graph.node)
