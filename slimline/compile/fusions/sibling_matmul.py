"""Merge MatMuls that read the same input into one wider MatMul and a Split.

    x ──┬── MatMul(Wq) ── q              x ── MatMul([Wq | Wk | Wv]) ── Split ──┬── q
        ├── MatMul(Wk) ── k      ==>                                          ├── k
        └── MatMul(Wv) ── v                                                   └── v

A decoder layer reads its normalised hidden state three times for Q, K and V (and twice for the
gate and up projections). One GEMM over the concatenated weights does the same arithmetic with one
kernel launch and one pass over the activations. For Q/K/V, GroupQueryAttention then reads the
packed result without the Split (``pack_attention_inputs``). The gate/up Split stays: on SmolLM2
its 30 copies took 3% of a decode step, but with the two MatMuls apart the error-driven 8-bit
fallback promoted 31 layers instead of 20, and decoding was no faster. After
weight-only quantization the merged weight is one MatMulNBits: its blocks run along K, so each
output column is quantized exactly as it would have been alone (RTN and GPTQ alike, since all the
merged columns share one input Hessian).

``check`` rejects, with a reason: fewer than two candidates, a non-constant or non-2-D weight,
weights of different K, and MatMuls whose output is a graph output.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


def check(model: Any, group: list[Any], init: dict[str, Any]) -> str | None:
    """None if ``group`` (MatMuls sharing input 0) can merge, else the reason it can't."""
    if len(group) < 2:
        return "a single reader"
    outputs = {o.name for o in model.graph.output}
    ks = set()
    for node in group:
        w = init.get(node.input[1])
        if w is None:
            return f"{node.name}: weight is not a constant"
        if len(w.dims) != 2:
            return f"{node.name}: weight is {len(w.dims)}-D"
        if node.output[0] in outputs:
            return f"{node.name}: output is a graph output"
        ks.add(w.dims[0])
    if len(ks) != 1:
        return f"weights of different K {sorted(ks)}"
    return None


def merge_sibling_matmuls(model: Any) -> tuple[int, dict[str, str]]:
    """Rewrite ``model`` in place; returns (merged groups, {input: rejection reason})."""
    from onnx import helper, numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[Any]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            readers[node.input[0]].append(node)
    merged, rejected = 0, {}
    replace: dict[int, list[Any]] = {}  # id(first node of a group) -> new nodes; other members dropped
    drop: set[int] = set()
    for x, group in readers.items():
        candidates = [n for n in group if n.input[1] in init]
        why = check(model, candidates, init)
        if why is not None:
            if len(group) > 1:
                rejected[x] = why
            continue
        weights = [numpy_helper.to_array(init[n.input[1]]) for n in candidates]
        name = "+".join(n.name for n in candidates)
        merged_w = numpy_helper.from_array(np.concatenate(weights, axis=1), f"{candidates[0].input[1]}_merged")
        sizes = numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{candidates[0].name}_split_sizes")
        model.graph.initializer.extend([merged_w, sizes])
        wide = f"{candidates[0].output[0]}_merged"
        matmul = helper.make_node("MatMul", [x, merged_w.name], [wide], name=name)
        # the first sibling's scope (``...self_attn.q_proj``) keeps the merged node's role: `role:attention.qkv@3`
        # and `role:ffn.in@3` still select it
        matmul.metadata_props.extend(candidates[0].metadata_props)
        replace[id(candidates[0])] = [
            matmul,
            helper.make_node("Split", [wide, sizes.name], [n.output[0] for n in candidates], name=f"{name}/split", axis=-1),
        ]
        drop.update(id(n) for n in candidates[1:])
        merged += 1
    if merged:
        nodes = []
        for node in model.graph.node:
            if id(node) in replace:
                nodes += replace[id(node)]
            elif id(node) not in drop:
                nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        drop_unread_initializers(model)
    return merged, rejected


def drop_unread_initializers(model: Any) -> None:
    """Remove the initializers no node reads any more (a proto edit leaves them behind)."""
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def pack_attention_inputs(model: Any) -> int:
    """GroupQueryAttention reading Q, K and V from one Split takes the packed tensor instead.

        MatMul([Wq|Wk|Wv]) ── Split ──┬── q ──┐          MatMul([Wq|Wk|Wv]) ── GQA(qkv, -, -)
                                     ├── k ──┼─ GQA  ==>
                                     └── v ──┘

    GroupQueryAttention's ``query`` input accepts ``[batch, seq, (heads + 2 * kv_heads) * head_size]``
    with ``key`` and ``value`` left empty; the kernel reads the three slices in place, so the Split's
    three copies go. Only a Split whose outputs feed nothing else, in Q, K, V order, is folded.
    Returns the number of attention nodes rewritten.
    """
    readers: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        for name in node.input:
            readers[name] += 1
    for out in model.graph.output:
        readers[out.name] += 1
    splits = {node.output[0]: node for node in model.graph.node if node.op_type == "Split" and len(node.output) == 3}
    packed, gone = 0, set()
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 3:
            continue
        split = splits.get(node.input[0])
        if split is None or list(split.output) != list(node.input[:3]) or any(readers[o] != 1 for o in split.output):
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        gone.add(id(split))
        packed += 1
    if gone:
        keep = [n for n in model.graph.node if id(n) not in gone]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return packed
