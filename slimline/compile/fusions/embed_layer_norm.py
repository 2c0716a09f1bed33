"""EmbedLayerNormalization: BERT's three embedding lookups, their sum and LayerNorm in one kernel.

    input_ids ───── Gather(word_embeddings) ──┐
    token_type_ids ─ Gather(type_embeddings) ─ Add ─┐
    arange[:S] ──── Gather(position_embeddings) ─── Add ── LayerNormalization(gamma, beta) ──
                                                        ==>
    Cast(int32)(input_ids), Cast(int32)(token_type_ids) ── EmbedLayerNormalization ──

slimline's own rule: onnxscript ships none for this op. Both summation orders ((word + type) + pos
and (word + pos) + type), either operand order of each Add, and models without token types
(DistilBERT) match. The kernel computes positions 0..S-1 itself, so ``check`` accepts only position
ids that are a constant ``arange`` sliced from 0 (what both exporters emit for absolute positions)
and rejects, with a reason, anything else: offset positions (RoBERTa's padding_idx + 1), non-constant
tables, a LayerNorm not over the last axis.
"""

from __future__ import annotations

import numpy as np

OP = "EmbedLayerNormalization"
ANCHORS = ("LayerNormalization", "SkipLayerNormalization")


def _embedding(value, depth: int = 3) -> bool:
    """Whether ``value`` is an embedding lookup, or a sum (through Adds) with one."""
    producer = value.producer() if value is not None else None
    if producer is None:
        return False
    if producer.op_type == "Gather":
        return producer.inputs[0] is not None and producer.inputs[0].const_value is not None
    return depth > 0 and producer.op_type == "Add" and any(_embedding(v, depth - 1) for v in producer.inputs)


def candidate(node) -> bool:
    """A LayerNormalization over an embedding sum (or a SkipLayerNormalization that took it instead)."""
    return any(_embedding(v) for v in node.inputs[: 2 if node.op_type == "SkipLayerNormalization" else 1])


def rules() -> list:
    from onnxscript.rewriter import _ir_utils, pattern

    class EmbedLayerNorm(pattern.RewriteRuleClassBase):
        def __init__(self, name, *, order: str):
            # remove_nodes=False: DistilBERT's export reads the word embeddings' shape (a second use that
            # would block the rewrite); the engine removes what is left dead after the step
            super().__init__(name, remove_nodes=False)
            self.order = order  # "wtp": (word + type) + pos; "wpt": (word + pos) + type; "wp": no token types

        def pattern(self, op, ids, segment_ids, word, seg, pos_table, pos_ids, gamma, beta):
            w = op.Gather(word, ids, _allow_other_attributes=True)
            p = op.Gather(pos_table, pos_ids, _allow_other_attributes=True)
            if self.order == "wp":
                total = op.Add(w, p)
            else:
                t = op.Gather(seg, segment_ids, _allow_other_attributes=True)
                total = op.Add(op.Add(w, t), p) if self.order == "wtp" else op.Add(op.Add(w, p), t)
            return op.LayerNormalization(total, gamma, beta, _allow_other_attributes=True, _outputs=["normed"])

        def check(self, context, ids, word, pos_table, pos_ids, gamma, beta, normed, seg=None, segment_ids=None, **_):
            result = pattern.MatchResult()
            tables = [("word", word), ("position", pos_table)] + ([("token type", seg)] if seg is not None else [])
            for what, table in tables:
                if table.const_value is None or table.shape is None or table.shape.rank() != 2:
                    return result.fail(f"the {what} embedding table is not a constant 2-D initializer", table)
            for what, value in [("gamma", gamma), ("beta", beta)]:
                if value.const_value is None:
                    return result.fail(f"LayerNorm {what} is not a constant", value)
            axis = normed.producer().attributes.get_int("axis", -1)
            if axis not in (-1, 2):
                return result.fail(f"LayerNormalization over axis {axis}, not the hidden axis", normed)
            for what, value in [("input_ids", ids)] + ([("token_type_ids", segment_ids)] if segment_ids is not None else []):
                if value.shape is None or value.shape.rank() != 2:
                    return result.fail(f"{what} is not a 2-D (batch, sequence) tensor", value)
            why = _arange_from_zero(pos_ids, _ir_utils)
            if why:
                return result.fail(f"position ids: {why}", pos_ids)
            return result

        def rewrite(self, op, ids, word, pos_table, gamma, beta, normed, seg=None, segment_ids=None, **_):
            eps = normed.producer().attributes.get_float("epsilon", 1e-5)
            ids32 = op.Cast(ids, to=6)  # INT32: the kernel's id type
            seg32 = op.Cast(segment_ids, to=6) if segment_ids is not None else None
            # ORT's type inference requires the mask_index output to exist, even when it is unused
            normed_out, _mask_index = op.EmbedLayerNormalization(
                ids32, seg32, word, pos_table, seg, gamma, beta, epsilon=eps, _domain="com.microsoft", _outputs=2
            )
            normed_out.shape, normed_out.type = normed.shape, normed.type  # contrib ops get no inferred shape
            return normed_out

    return [
        rule for order in ("wtp", "wpt", "wp") for rule in EmbedLayerNorm.rule(f"embed_layer_norm_{order}", order=order).commute()
    ]


def _arange_from_zero(pos_ids, ir_utils) -> str | None:
    """None if ``pos_ids`` is ``arange(...)[..., 0:S]`` from a constant buffer, else why not."""
    node = pos_ids.producer()
    if node is None:
        return "a graph input (the kernel computes positions 0..S-1 itself; export without position_ids)"
    if node.op_type != "Slice":
        return f"computed by {node.op_type}, not sliced from a constant arange"
    table = ir_utils.get_numpy_value(node.inputs[0])
    start = ir_utils.get_numpy_value(node.inputs[1])
    steps = ir_utils.get_numpy_value(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if table is None or start is None:
        return "the position buffer or the slice start is not a constant"
    if int(start.reshape(-1)[0]) != 0 or (steps is not None and int(steps.reshape(-1)[0]) != 1):
        return f"positions start at {int(start.reshape(-1)[0])}, the kernel's start at 0"
    flat = table.reshape(-1)
    if not np.array_equal(flat, np.arange(flat.size)):
        return "the position buffer is not 0, 1, 2, ..."
    return None
