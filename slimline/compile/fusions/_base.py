"""What every fusion module provides, and the tracer that turns failed matches into reasons.

A fusion module (one per fused ONNX Runtime op) declares:

- ``OP``: the com.microsoft op it produces (the name a recipe's ``expect`` uses);
- ``ANCHORS``: the op types that mark an unfused candidate left in the graph (a Softmax for
  attention, an Erf for Gelu, ...), so that a shortfall names the layers that did not fuse;
- ``rules()``: onnxscript rewrite rules (``pattern`` -> ``rewrite``, with a ``check`` that says why
  a candidate is rejected). Some are slimline's own; where onnxscript's rule is right we reuse it.
- optionally ``candidate(node)``: whether an anchor node is really a candidate (a LayerNormalization
  fed by an Add, not any LayerNormalization).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

LAYER = re.compile(r"((?:layers?|h|blocks?)[./_]\d+)")


@dataclass
class Attempt:
    """One failed match of a rule at a root node: how far it got and why it stopped."""

    rule: str
    root: Any  # ir.Node
    nodes: list[Any]
    status: str  # "no match" (the graph's shape differs) or "rejected" (check() said no)
    reason: str
    score: int


@dataclass
class Tracer:
    """An onnxscript MatchingTracer that keeps every failed attempt, not only the best one."""

    attempts: list[Attempt] = field(default_factory=list)

    def log(self, rule, container, node, match_result, status) -> None:  # onnxscript's tracer protocol
        from onnxscript.rewriter._basics import MatchStatus

        if status == MatchStatus.SUCCESS:
            return
        nodes = list(match_result.nodes)
        if not nodes and status == MatchStatus.NO_MATCH:
            return  # the root op type differs: not an attempt worth reporting
        reason = match_result.reason or "the subgraph's shape differs from the pattern"
        self.attempts.append(
            Attempt(
                rule=rule.name or type(rule).__name__,
                root=node,
                nodes=nodes,
                status="rejected" if status == MatchStatus.CONDITION_FAILED else "no match",
                reason=reason.strip().splitlines()[0][:300],
                score=len(nodes) + int(status) * 100,
            )
        )

    def report(self) -> None:  # onnxscript calls this only when asked to print
        pass

    def explain(self, anchor: Any, hops: int = 6) -> Attempt | None:
        """The furthest-reaching attempt that touched ``anchor``; failing that, the best attempt
        rooted a few nodes downstream of it (a pattern is matched from its output backwards, so an
        unexpected op between the anchor and the root stops the match before it reaches the anchor).
        None if no rule got near."""
        touching = [a for a in self.attempts if a.root is anchor or any(n is anchor for n in a.nodes)]
        if touching:
            return max(touching, key=lambda a: a.score)
        downstream, frontier = set(), [anchor]
        for _ in range(hops):
            frontier = [use for node in frontier for out in node.outputs for use, _ in out.uses()]
            downstream.update(id(n) for n in frontier)
        near = [a for a in self.attempts if id(a.root) in downstream]
        return max(near, key=lambda a: a.score) if near else None


def locate(node: Any) -> str:
    """A human name for where ``node`` sits: its module path if the exporter kept one.

    The legacy exporter names nodes after modules (``/encoder/layer.0/attention/self/Softmax``);
    the dynamo exporter does not (``node_Softmax_102``), but its initializers keep the module path
    (``encoder.layer.0.attention.self.query.bias``), so we walk up to the nearest named weight.
    """
    name = node.name or ""
    if "/" in name:
        return name.strip("/").rsplit("/", 1)[0].replace("/", ".")
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:  # the dynamo exporter's module path, e.g. ['', 'encoder', 'encoder.layer.0', ...]
        names = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
        dotted = [s for s in names if "." in s or LAYER.search(s)]
        if dotted:
            return dotted[-1]
    for value in node.inputs[1:]:  # a fused node's own weights (gamma, word embeddings, ...)
        if value is not None and value.const_value is not None and "." in (value.name or "") and "::" not in value.name:
            return value.name.rsplit(".", 1)[0]
    seen, frontier = set(), [node]
    for _ in range(12):  # breadth-first, a few levels up
        nxt = []
        for n in frontier:
            for value in n.inputs:
                if value is None or id(value) in seen:
                    continue
                seen.add(id(value))
                if (value.const_value is not None or value.is_initializer()) and LAYER.search(value.name or ""):
                    return value.name.rsplit(".", 1)[0]
                if value.producer() is not None:
                    nxt.append(value.producer())
        frontier = nxt
    return name or node.op_type


def layer_of(where: str) -> str:
    """``encoder.layer.3.attention.self`` -> ``layer.3`` (for grouping), else the whole string."""
    match = LAYER.search(where)
    return match.group(1).replace("/", ".") if match else where
