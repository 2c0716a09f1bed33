"""Which execution provider ONNX Runtime gave each node: CPU fallback detection for GPU targets.

ONNX Runtime silently runs a node on the CPU EP when the CUDA EP has no kernel for it (int8
QAttention / MatMulInteger / DynamicQuantizeLinear, a custom op built without CUDA), copying its
inputs and outputs across the bus each run. The placement is read from ORT's own profile of one run
(every node's event names its provider). Small integer shape computations (Shape, Gather on shapes,
...) are placed on the CPU on purpose and are listed apart; every other node on the CPU is a
fallback, and a recipe whose required target is ``ort-cuda`` fails on any (evaluate.budgets).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# ops ORT deliberately runs on the CPU when they compute shapes or indices (int64 tensors of a few elements)
SHAPE_OPS = frozenset(
    {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Reshape", "Range", "ConstantOfShape"}
    | {"Expand", "Equal", "Where", "Sub", "Add", "Mul", "Div", "ReduceSum", "Less", "Greater", "Not", "Identity"}
)


@dataclass
class Placement:
    providers: dict[str, str] = field(default_factory=dict)  # node name -> provider
    ops: dict[str, str] = field(default_factory=dict)  # node name -> op type
    shape_only: set[str] = field(default_factory=set)  # CPU nodes that only compute shapes

    @property
    def fallbacks(self) -> list[str]:
        """Nodes on the CPU EP that compute on tensors (not shape bookkeeping), in graph order."""
        return [n for n, p in self.providers.items() if p == "CPUExecutionProvider" and n not in self.shape_only]

    def summary(self) -> dict[str, Any]:
        on_cpu = [n for n, p in self.providers.items() if p == "CPUExecutionProvider"]
        return {
            "nodes": len(self.providers),
            "on_cpu_shape_only": len(on_cpu) - len(self.fallbacks),
            "cpu_fallback_nodes": [f"{n} ({self.ops.get(n, '?')})" for n in self.fallbacks],
        }


def placement(path: Path, providers: list, feeds: dict[str, np.ndarray], threads: int = 0) -> Placement:
    """Run the model once with ORT's profiler on and read each node's provider off the profile."""
    import onnx

    from slimline.runtime import ort_session

    with tempfile.TemporaryDirectory(prefix="slimline-placement-") as tmp:
        session = ort_session(path, threads, providers, profile=Path(tmp) / "profile")
        names = {i.name for i in session.get_inputs()}
        session.run(None, {k: v for k, v in feeds.items() if k in names})
        events = json.loads(Path(session.end_profiling()).read_text())
    result = Placement()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            result.providers[node] = e.get("args", {}).get("provider", "?")
            result.ops[node] = e.get("args", {}).get("op_name", "?")
    graph = onnx.load(str(path), load_external_data=False).graph
    value_types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    ints = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}
    for node in graph.node:
        if node.name in result.providers and node.op_type in SHAPE_OPS:
            # unknown output types count as shape work only for ops that make shapes by nature
            kinds = [value_types.get(o) for o in node.output if o]
            if node.op_type in ("Shape", "Size") or all(k in ints for k in kinds if k) and any(kinds):
                result.shape_only.add(node.name)
    return result
