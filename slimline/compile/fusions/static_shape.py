"""Fold the static part of a dynamic shape into a constant (a helper rule, not a fused op).

    x ── Shape ── Slice[-1:] ── Cast ── Sqrt ── ...      ==>     Constant([32]) ── Cast ── Sqrt ── ...

The legacy (TorchScript) exporter computes attention's scale at run time from the head size it
reads off ``Shape(q)``. The head size is static (only batch and sequence are dynamic), but neither
onnx's nor onnxscript's constant folding can see that through the Shape -> Slice. Once this rule
has replaced the slice with its value, constant folding reduces the whole chain to one scalar and
the attention pattern can read the scale.

``check`` rejects a slice whose bounds are not constants or that selects a dynamic dimension.
"""

from __future__ import annotations

import numpy as np

OP = None  # produces no fused op


def rules() -> list:
    from onnxscript.rewriter import _ir_utils, pattern

    class FoldStaticShapeSlice(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, starts, ends):
            return op.Slice(
                op.Shape(x, _allow_other_attributes=True, _outputs=["shape"]),
                starts,
                ends,
                _allow_other_inputs=True,
                _outputs=["sliced"],
            )

        def _dims(self, x, shape, starts, ends, sliced):
            node = sliced.producer()
            extra = [_ir_utils.get_numpy_value(v) for v in node.inputs[3:]]
            if x.shape is None or any(v is None for v in extra):
                return None
            s, e = _ir_utils.get_numpy_value(starts), _ir_utils.get_numpy_value(ends)
            if s is None or e is None or s.size != 1 or e.size != 1:
                return None
            if len(extra) > 0 and int(extra[0].reshape(-1)[0]) not in (0, -1):
                return None
            step = int(extra[1].reshape(-1)[0]) if len(extra) > 1 else 1
            shape_node = shape.producer()
            lo = shape_node.attributes.get_int("start", 0)
            hi = shape_node.attributes.get_int("end", x.shape.rank())
            dims = list(x.shape)[lo:hi]
            e_val = int(e.reshape(-1)[0])
            picked = dims[int(s.reshape(-1)[0]) : (e_val if e_val < 2**62 else None) : step]
            return picked if picked and all(isinstance(d, int) for d in picked) else None

        def check(self, context, x, shape, starts, ends, sliced, **_):
            result = pattern.MatchResult()
            if self._dims(x, shape, starts, ends, sliced) is None:
                return result.fail("the sliced dimensions are dynamic or the bounds are not constants", sliced)
            return result

        def rewrite(self, op, x, shape, starts, ends, sliced, **_):
            dims = self._dims(x, shape, starts, ends, sliced)
            from onnx_ir import tensor

            return op.Constant(value=tensor(np.array(dims, dtype=np.int64)))

    return [FoldStaticShapeSlice.rule("fold_static_shape_slice")]


def fold_constant_concats(model) -> int:
    """Concatenate constant inputs of Concat once, at fusion time (a helper pass, not a fused op).

    onnxscript's Attention rule packs Q, K and V weights with a Concat node, and its constant folding
    skips inputs above a size limit, so every inference would concatenate 3 x 384 x 384 floats again.
    Returns the Concats folded into initializers.
    """
    import onnx_ir as ir

    folded = 0
    for node in list(model.graph):
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            continue
        if not node.inputs or any(v is None or v.const_value is None for v in node.inputs):
            continue
        arrays = [v.const_value.numpy() for v in node.inputs]
        value = ir.Value(
            name=f"{node.outputs[0].name}_folded",
            const_value=ir.tensor(np.concatenate(arrays, axis=node.attributes.get_int("axis", 0))),
        )
        value.shape = ir.Shape(value.const_value.shape)
        value.type = ir.TensorType(value.const_value.dtype)
        model.graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        model.graph.remove(node, safe=True)
        folded += 1
    return folded


def canonical_sums(model) -> int:
    """Write every symbolic dimension that is a sum of names with its terms sorted.

    torch's exporter names the same length ``past + seq`` in one place and ``seq + past`` in another
    (an eager-attention Gemma's full-attention layers); onnxscript's shape checks compare the names as
    strings and reject the match. Returns how many dimensions were rewritten."""
    import re

    import onnx_ir as ir

    term = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
    changed = 0
    values = [*model.graph.inputs, *(out for node in model.graph for out in node.outputs)]
    for value in values:
        shape = value.shape
        if shape is None:
            continue
        dims = list(shape)
        for i, dim in enumerate(dims):
            name = getattr(dim, "value", None)
            if not isinstance(name, str) or " + " not in name:
                continue
            parts = name.split(" + ")
            if all(term.match(p) for p in parts) and parts != sorted(parts):
                dims[i] = ir.SymbolicDim(" + ".join(sorted(parts)))
                changed += 1
        if changed and dims != list(shape):
            value.shape = ir.Shape(dims)
    return changed
