"""``compile.fuse: {rotary_tables: true}``: a decoder's rotary cos/sin tables as constants.

The exported decoder computes GroupQueryAttention's cos/sin caches in the graph at every run: a
``Range`` over the attention mask's length, times the inverse frequencies, then Cos and Sin. That is
a handful of kernels per step, and on the CUDA EP the ``Range`` runs on the CPU (its inputs are shape
values) and its output is copied up: a copy node that stops ONNX Runtime from capturing the step as a
CUDA graph ("all compute graph nodes have not been partitioned"). This pass runs that subgraph once
for the model's whole context (``max_position_embeddings``) and stores the tables as initializers,
computed in float32 as before; the chain is then dead and removed. GroupQueryAttention reads row
``position`` of each table, so a table longer than the current sequence changes nothing.

The tables cost ``2 x context x head_dim/2`` values (SmolLM2: 8,192 x 32 x 2 in fp32, 2 MiB). Graphs
whose tables depend on anything but the mask's length (position_ids, say) are left as they are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from slimline.compile.fusions.gqa_lengths import remove_dead_nodes


def fold_rotary_tables(model: Any, context: int) -> tuple[int, str]:
    """Replace the computed cos/sin inputs of every GroupQueryAttention node by constant tables of
    ``context`` rows. Returns (nodes removed, what was done or why not). Edits ``model`` in place."""
    import onnx
    from onnx import numpy_helper

    from slimline.runtime import ort_session

    graph = model.graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention" and len(n.input) > 8 and n.input[7] and n.input[8]]
    if not gqa:
        return 0, "no GroupQueryAttention with rotary caches"
    names = {(n.input[7], n.input[8]) for n in gqa}
    if len(names) != 1:
        return 0, f"{len(names)} different cos/sin inputs: left as they are"
    cos, sin = next(iter(names))
    producers = {o: n for n in graph.node for o in n.output if o}
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input}
    if cos in inits and sin in inits:
        return 0, "already constant"
    chain, todo, seen, reads = [], [cos, sin], set(), set()
    while todo:
        t = todo.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in producers:
            node = producers[t]
            if id(node) not in {id(c) for c in chain}:
                chain.append(node)
                todo += list(node.input)
        elif t in graph_inputs:
            reads.add(t)
    if reads != {"attention_mask"}:
        return 0, f"the tables are computed from {sorted(reads) or 'nothing'}, not the mask's length alone: left as they are"
    order = [n for n in graph.node if any(n is c for c in chain)]
    used = {i for n in order for i in n.input}
    sub = onnx.helper.make_graph(
        order,
        "rotary_tables",
        [graph_inputs["attention_mask"]],
        [onnx.helper.make_empty_tensor_value_info(cos), onnx.helper.make_empty_tensor_value_info(sin)],
        [inits[i] for i in used if i in inits],
    )
    sub_model = onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    with tempfile.TemporaryDirectory(prefix="slimline-rotary-") as tmp:
        path = Path(tmp) / "rotary.onnx"
        path.write_bytes(sub_model.SerializeToString())
        c, s = ort_session(path, 1).run([cos, sin], {"attention_mask": np.ones((1, context), np.int64)})
    if c.shape[0] != context or c.shape != s.shape:
        return 0, f"the table subgraph gave shapes {c.shape}/{s.shape}, not [{context}, d]: left as they are"
    graph.initializer.extend(
        [numpy_helper.from_array(c, "slimline_rotary_cos"), numpy_helper.from_array(s, "slimline_rotary_sin")]
    )
    for n in gqa:
        n.input[7], n.input[8] = "slimline_rotary_cos", "slimline_rotary_sin"
    removed = remove_dead_nodes(model)
    return removed, f"cos/sin tables of {c.shape[0]} x {c.shape[1]} ({c.dtype}) as initializers; {removed} nodes removed"
