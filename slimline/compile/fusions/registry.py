"""The fusion registry: one record per fused op, and the graph passes, in the order they run.

Everything else is derived from these two tables: the steps ``fuse_model`` runs, the op types it
counts, the names ``compile.fuse``'s ``skip`` accepts (and the ONNX Runtime optimizer switches each
one turns off under ``engine: ort``), ``compile.tune``'s candidates (the records with an unfused
form), and what ``slimline inspect --fusions`` reports. Adding a fused op is its rule module, one
``FusedOp`` record here, and its tests (docs/compile.md shows one worked through).

Order matters: the embedding sum looks like a skip-LayerNorm, slimline's BERT attention must see the
graph before onnxscript's SDPA rule, and GroupQueryAttention must take decoders' SDPA before the
MultiHeadAttention chain does. Each step's leftovers are diagnosed right after it, on the graph its
rules saw (a later rule may take the same nodes: SkipLayerNormalization fuses an embedding sum that
EmbedLayerNormalization rejected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimline.compile.fusions import (
    attention,
    embed_layer_norm,
    gelu,
    gqa_lengths,
    group_query_attention,
    quick_gelu,
    rms_norm,
    rotary_embedding,
    sibling_matmul,
    skip_layer_norm,
    skip_rms_norm,
    unfuse,
    unused_outputs,
)


@dataclass(frozen=True)
class FusedOp:
    """One step of the fusion engine and the fused op it makes.

    ``module`` holds the rules (``rules()``, ``ANCHORS``, optionally ``candidate``); ``apply`` runs
    them when onnxscript's ``RewriteRuleSet`` alone is not enough. ``skip_names`` are the names
    ``compile.fuse: {skip: [...]}`` accepts for this step, each with the ONNX Runtime optimizer
    switches it turns off under ``engine: ort``. ``unfuse`` rewrites the fused op back into
    standard ops (a ModelProto in place, returning the count): ``compile.tune`` times both forms."""

    op: str
    step: str
    module: Any
    apply: Callable[..., int] | None = None
    diagnose: bool = True
    skip_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unfuse: Callable[[Any], int] | None = None
    unfused_op: str | None = None  # the op its unfused form ends in (compile.tune checks ORT keeps it)
    diagnose_with: Callable[..., int] | None = None  # the rules to trace for reasons, when not ``apply``'s


FUSED_OPS_TABLE: tuple[FusedOp, ...] = (
    FusedOp(
        "EmbedLayerNormalization",
        "embed_layer_norm",
        embed_layer_norm,
        skip_names={"EmbedLayerNormalization": ("enable_embed_layer_norm",)},
    ),
    # diagnosed after onnxscript's chain has had its turn
    FusedOp(
        "Attention", "attention", attention, attention.apply, diagnose=False, skip_names={"Attention": ("enable_attention",)}
    ),
    FusedOp("SimplifiedLayerNormalization", "rms_norm", rms_norm, skip_names={"SimplifiedLayerNormalization": ()}),
    FusedOp(
        "SkipLayerNormalization",
        "skip_layer_norm",
        skip_layer_norm,
        skip_names={"SkipLayerNormalization": ("enable_skip_layer_norm", "enable_bias_skip_layer_norm")},
        unfuse=unfuse.skip_layer_norm,
        unfused_op="LayerNormalization",
    ),
    FusedOp(
        "SkipSimplifiedLayerNormalization",
        "skip_rms_norm",
        skip_rms_norm,
        skip_names={"SkipSimplifiedLayerNormalization": ()},
        unfuse=unfuse.skip_simplified_layer_norm,
        unfused_op="SimplifiedLayerNormalization",
    ),
    FusedOp("RotaryEmbedding", "rotary_embedding", rotary_embedding, rotary_embedding.apply, skip_names={"RotaryEmbedding": ()}),
    FusedOp(
        "GroupQueryAttention",
        "group_query_attention",
        group_query_attention,
        group_query_attention.apply,
        skip_names={"GroupQueryAttention": ()},
    ),
    # onnxscript's SDPA -> MultiHeadAttention -> Attention chain, for what slimline's BERT rule left
    # (its leftovers are explained by slimline's BERT rule, traced: the chain itself has no reasons to give)
    FusedOp(
        "Attention",
        "attention_chain",
        attention,
        lambda model, tracer=None: attention.apply_chain(model),
        diagnose_with=attention.apply,
    ),
    FusedOp(
        "BiasGelu",
        "gelu",
        gelu,
        gelu.apply,
        skip_names={"BiasGelu": ("enable_bias_gelu",), "Gelu": ("enable_gelu", "enable_bias_gelu")},
        unfuse=unfuse.bias_gelu,
        unfused_op="Gelu",
    ),
    FusedOp("QuickGelu", "quick_gelu", quick_gelu, skip_names={"QuickGelu": ()}),
)

# Ops only ONNX Runtime's optimizer (``engine: ort``) makes, which ``skip`` can still turn off there.
ORT_ONLY_SKIPS: dict[str, tuple[str, ...]] = {"LayerNormalization": ("enable_layer_norm",)}

# Fused ops counted in reports and contracts besides the records' own: what onnxscript's chain and
# ORT's optimizer make, and what dynamic int8 makes of Attention (inspect shows them on quantized files).
ALSO_COUNTED = (
    "MultiHeadAttention",
    "FastGelu",
    "Gelu",
    "LayerNormalization",
    "FusedMatMul",
    "QAttention",
    "QEmbedLayerNormalization",
)


@dataclass(frozen=True)
class GraphPass:
    """A rewrite outside the rule engine, run on the fused ModelProto; ``run`` returns its count
    (or the count and, per input, why it did nothing)."""

    name: str  # its count in the stage report: `rules.<name>`
    decoder_only: bool
    run: Callable[[Any], Any]


GRAPH_PASSES: tuple[GraphPass, ...] = (
    GraphPass("dropped_unused_outputs", False, unused_outputs.drop_unused_outputs),
    GraphPass("merged_sibling_matmuls", True, sibling_matmul.merge_sibling_matmuls),
    GraphPass("packed_qkv_attention", True, sibling_matmul.pack_attention_inputs),
    GraphPass("gqa_lengths_from_mask", True, gqa_lengths.lengths_from_mask),
)


def fused_ops() -> tuple[str, ...]:
    """Every op type counted as fused, records first, in order."""
    return tuple(dict.fromkeys([*(r.op for r in FUSED_OPS_TABLE), *ALSO_COUNTED]))


def skip_names() -> tuple[str, ...]:
    """The names ``compile.fuse``'s ``skip`` accepts."""
    return tuple(dict.fromkeys([n for r in FUSED_OPS_TABLE for n in r.skip_names] + list(ORT_ONLY_SKIPS)))


def ort_switches() -> dict[str, tuple[str, ...]]:
    """skip name -> the ONNX Runtime optimizer switches it turns off (``engine: ort``)."""
    out: dict[str, tuple[str, ...]] = dict(ORT_ONLY_SKIPS)
    for record in FUSED_OPS_TABLE:
        for name, flags in record.skip_names.items():
            out[name] = tuple(dict.fromkeys([*out.get(name, ()), *flags]))
    return out


def skipped(record: FusedOp, skip: tuple[str, ...]) -> bool:
    """Whether ``skip`` turns this step off (by its op or one of its names)."""
    return record.op in skip or any(name in skip for name in record.skip_names)


def unfusable() -> dict[str, FusedOp]:
    """op -> record, for the fused ops ``compile.tune`` can time against their unfused form."""
    return {r.op: r for r in FUSED_OPS_TABLE if r.unfuse is not None}
