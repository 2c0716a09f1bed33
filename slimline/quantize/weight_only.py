"""``quantize.weight_only``: 4- or 8-bit group-wise weights in ONNX Runtime's ``MatMulNBits``.

Activations stay float; each MatMul with a constant 2-D weight becomes one MatMulNBits node
(``accuracy_level: 4`` lets the CPU kernel quantize activations to int8 on the fly and use integer
dot products, the fastest CPU path). The codes come from ``slimline.quantize.nbits``: RTN, HQQ or
GPTQ (calibrated on the recipe's data). Fused ops that carry their own weights (Attention,
EmbedLayerNormalization) stay float, and the report counts them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimline import onnxfile
from slimline.artifact import OnnxModel
from slimline.errors import StageError
from slimline.measure.inputs import calibration_feeds, check_texts
from slimline.measure.metrics import relative_error
from slimline.ops import DOMAIN, q4
from slimline.quantize import calib, nbits
from slimline.quantize.common import (
    OnnxQuantizer,
    choose_fallback,
    fidelity_guard,
    loads_in_ort,
    matching_nodes,
    refuse_quantized,
    report_fallback,
    roles_are_known,
    weight_of,
)
from slimline.stage import Context, StageResult


def replace_matmuls(model: Any, blocks: dict[str, nbits.Blocked], accuracy_level: int, kernel: str = "ort") -> Any:
    """Swap each named MatMul for MatMulNBits with its packed weights, or, with ``kernel`` "slimline",
    for slimline's MatMulQ4 / MatMulQ8 where the weights fit them (``q4_kernel``); drop float weights no
    one reads."""
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = []
    for node in graph.node:
        b = blocks.get(node.name)
        if node.op_type not in ("MatMul", "FusedMatMul") or b is None:
            nodes.append(node)
            continue
        k, n = b.k, b.scale.shape[0]
        if kernel == "slimline" and q4_kernel(b):
            packed = nbits.pack_q(b)
            names = [f"{node.name or node.input[1]}_q{b.bits}m_{key}" for key in packed]
            graph.initializer.extend(numpy_helper.from_array(v, nm) for v, nm in zip(packed.values(), names, strict=True))
            op = q4.matmul_op(b.bits)
            nodes.append(
                helper.make_node(
                    op, [node.input[0], *names], list(node.output), name=node.name, domain=DOMAIN, K=k, N=n, block_size=32
                )
            )
            if not any(o.domain == DOMAIN for o in model.opset_import):
                model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
            continue
        packed = nbits.pack(b)
        names = [f"{node.name or node.input[1]}_q{b.bits}_{key}" for key in packed]
        graph.initializer.extend(numpy_helper.from_array(v, nm) for v, nm in zip(packed.values(), names, strict=True))
        attrs = {"K": k, "N": n, "bits": b.bits, "block_size": b.block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        nodes.append(
            helper.make_node(
                "MatMulNBits", [node.input[0], *names], list(node.output), name=node.name, domain="com.microsoft", **attrs
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    read = {i for nd in graph.node for i in nd.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def q4_kernel(b: nbits.Blocked) -> bool:
    """Whether ``kernel: slimline`` puts these weights in MatMulQ4 (4 bits) or MatMulQ8 (8 bits): asymmetric,
    blocks of 32 along a K divisible by 32 (``quantize_weight`` fits those with float minimums). Decided
    by the format, not by the values: a Q4_0 source gives whole-number zero points, and still goes to
    MatMulQ4."""
    return q4.fits(b.bits, b.block_size, b.k) and not b.symmetric


def _int4(values: np.ndarray) -> bytes:
    """ONNX's packed 4-bit layout: consecutive elements (row-major) in low then high nibble."""
    flat = values.astype(np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _gather_quantized(inputs: list[str], gather: Any, block_size: int, bits: int) -> Any:
    """GatherBlockQuantized replacing ``gather``: rows of a table quantized in blocks along the hidden axis."""
    from onnx import helper

    return helper.make_node(
        "GatherBlockQuantized",
        inputs,
        list(gather.output),
        name=gather.name,
        domain="com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=block_size,
        bits=bits,
    )


def split_wide(model: Any, max_bytes: int) -> dict[str, int]:
    """Split each MatMulNBits whose packed weights exceed ``max_bytes`` along N into parts + a Concat.

    ONNX Runtime prepacks a weight while its mapped original is still resident, so loading peaks at
    the steady state plus the largest single weight. An 8-bit SmolLM2 LM head (28 MB) set that peak;
    in four parts the peak was 7 MB over the steady state. Each part costs a kernel launch and the
    Concat a copy of the logits, so parts stay as large as ``max_bytes`` allows. Results are identical (each output column
    is computed from its own row of weights) and the parts keep any view marks, shifted.
    Returns {node: parts}.
    """
    from onnx import helper, numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    split: dict[str, int] = {}
    nodes = []
    for node in model.graph.node:
        weight = init.get(node.input[1]) if node.op_type == "MatMulNBits" and len(node.input) > 1 else None
        if weight is None or len(node.input) > 4 or len(weight.raw_data) <= max_bytes:  # no g_idx / bias
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n = attrs["N"]
        parts = -(-len(weight.raw_data) // max_bytes)
        rows = -(-n // parts)
        bounds = [(r, min(r + rows, n)) for r in range(0, n, rows)]
        outs = []
        for j, (lo, hi) in enumerate(bounds):
            names = []
            for name in node.input[1:]:
                source = init[name]
                values = numpy_helper.to_array(source)
                per_row = values.reshape(n, -1)
                rows_of = np.ascontiguousarray(per_row[lo:hi])
                shape = (-1,) if values.ndim == 1 else (hi - lo, *values.shape[1:])
                part = numpy_helper.from_array(rows_of.reshape(shape), f"{name}_part{j}")
                view = onnxfile.view_of(source)
                if view:
                    onnxfile.mark_view(part, view[0], view[1] + lo * per_row[0].nbytes)
                model.graph.initializer.append(part)
                names.append(part.name)
            outs.append(f"{node.output[0]}_part{j}")
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [node.input[0], *names],
                    [outs[-1]],
                    name=f"{node.name}_part{j}",
                    domain="com.microsoft",
                    **{**attrs, "N": hi - lo},
                )
            )
        nodes.append(helper.make_node("Concat", outs, list(node.output), name=f"{node.name}_concat", axis=-1))
        split[node.name] = len(bounds)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return split


def quantize_embeddings(model: Any, bits: int, block_size: int, tied: dict[str, Any] | None = None) -> dict[str, float | str]:
    """Token-embedding Gathers (a constant ``[vocab, hidden]`` table, axis 0) -> GatherBlockQuantized.

    Blocks run along the hidden dimension, asymmetric, with integer zero points. Returns each
    table's relative reconstruction error. ``tied`` maps a table to the MatMulNBits or MatMulQ4/Q8 node of
    an LM head that reads the same table (tied embeddings) and was quantized with the same bits. A
    MatMulQ4/Q8 head's packed weights serve the Gather as they are (slimline's GatherQ4/Q8 read that layout;
    no prepacking, so one mapped copy serves both). A MatMulNBits head's: the
    Gather then gets the head's packed weights, scales and zero points as its own initializers,
    marked as views of the same bytes, so the saved artifact stores the table once
    (``slimline.onnxfile``). Separate initializers keep the Gather's table memory-mapped and mostly
    untouched at run time, while ONNX Runtime prepacks the head's copy and releases it; a shared
    initializer (or a Reshape of it, which ONNX Runtime constant-folds into a heap copy) kept 28 MB
    resident for SmolLM2.
    """
    from onnx import TensorProto, helper, numpy_helper

    init = {t.name: t for t in model.graph.initializer}
    errors = {}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        table = init.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or len(table.dims) != 2 or attrs.get("axis", 0) != 0 or table.dims[1] % block_size:
            nodes.append(node)
            continue
        head = (tied or {}).get(node.input[0])
        if head is not None and head.op_type in ("MatMulQ4", "MatMulQ8"):  # rows of the head's own packed weights, no copy
            vocab, hidden = table.dims
            nodes.append(
                helper.make_node(
                    head.op_type.replace("MatMul", "Gather"),
                    [*head.input[1:4], node.input[1]],
                    list(node.output),
                    name=node.name,
                    domain=DOMAIN,
                    K=hidden,
                    N=vocab,
                    block_size=32,
                )
            )
            errors[node.name] = "shared with the LM head"  # its error is the head's, among the layers
            continue
        if head is not None:
            vocab = table.dims[0]
            own = []
            for role, name in zip(("table", "scales", "zero"), head.input[1:4], strict=False):
                source = init[name]
                values = numpy_helper.to_array(source)
                copy = numpy_helper.from_array(values.reshape(vocab, -1), f"{node.name}_{role}")
                model.graph.initializer.append(copy)
                onnxfile.mark_view(source, copy.name)  # stored once: the head's tensor is these bytes
                own.append(copy.name)
            nodes.append(_gather_quantized([own[0], node.input[1], *own[1:]], node, block_size, bits))
            errors[node.name] = "shared with the LM head"  # its error is the head's, among the layers
            continue
        e = numpy_helper.to_array(table)
        b = nbits.rtn(np.ascontiguousarray(e.T), bits, block_size)  # q: [vocab, hidden]
        errors[node.name] = relative_error(e, b.dequantize().T)
        base = f"{node.name}_q{bits}"
        if bits == 4:
            data = helper.make_tensor(f"{base}_data", TensorProto.UINT4, list(e.shape), _int4(b.q), raw=True)
            zero = helper.make_tensor(f"{base}_zero", TensorProto.UINT4, list(b.zero.shape), _int4(b.zero), raw=True)
        else:
            data = numpy_helper.from_array(b.q.astype(np.uint8), f"{base}_data")
            zero = numpy_helper.from_array(b.zero.astype(np.uint8), f"{base}_zero")
        scale = numpy_helper.from_array(b.scale.astype(np.float32), f"{base}_scale")
        model.graph.initializer.extend([data, scale, zero])
        nodes.append(_gather_quantized([data.name, node.input[1], scale.name, zero.name], node, block_size, bits))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return errors


class LayerFormat(BaseModel):
    """One layer's own weight format in ``quantize.weight_only.layers``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bits: Literal[4, 8]
    block_size: Literal[16, 32, 64, 128, 256] | None = Field(None, description="default: the stage's block size for these bits")


class WeightOnly(OnnxQuantizer):
    """Group-wise int4/int8 weights (RTN, HQQ or GPTQ) into MatMulNBits, with per-layer output error."""

    kind = "quantize.weight_only"
    consumes = (OnnxModel,)

    bits: Literal[4, 8] = Field(4, description="bits per weight")
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="weights per scale (along the input dimension)")
    symmetric: bool = Field(False, description="no zero points (codes centred on 2^(bits-1)); HQQ is always asymmetric")
    algorithm: Literal["rtn", "hqq", "gptq"] = Field(
        "rtn", description="rtn: round to nearest; hqq: fitted zero points; gptq: calibrated"
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (fastest on CPU)"
    )
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ: fraction of the mean Hessian diagonal added to it")
    act_order: bool = Field(True, description="GPTQ: quantize columns in order of decreasing activation energy")
    clip_search: bool = Field(
        False,
        description="RTN/GPTQ: per block, shrink the range by up to 25% where that lowers the squared rounding error "
        "(clips rare outliers for a finer step)",
    )
    fallback_bits: Literal[8] | None = Field(
        None, description="fallback: auto puts layers over max_layer_error in this many bits instead of float"
    )
    fallback_block_size: Literal[16, 32, 64] | None = Field(
        None,
        description="fallback: auto first retries a layer over max_layer_error at `bits` in blocks of this size "
        "(smaller than block_size); only a layer still over it goes to fallback_bits (or float). A 4-bit layer in "
        "blocks of 16 reads ~5.3 bits per weight, against ~8.3 in 8 bits",
    )
    head_bits: Literal[4, 8] | None = Field(
        None, description="bits for the MatMul producing the `logits` output (the LM head); default: `bits`"
    )
    block_size_8bit: Literal[16, 32, 64, 128, 256] | None = Field(
        None,
        description="block size for the 8-bit weights (bits/head_bits/fallback_bits/embedding_bits 8); default: "
        "block_size. 8-bit codes lose little to longer blocks, and each block costs a float scale (and, once "
        "ONNX Runtime prepacks it, a float block sum): SmolLM2's 8-bit layers at 64 instead of 32 took 10 MB off peak RSS",
    )
    max_weight_mb: float | None = Field(
        16.0,
        gt=0,
        description="split a MatMulNBits with more packed weight bytes than this along N (identical results; "
        "bounds ONNX Runtime's load-time peak, which holds one weight twice while prepacking it); null: never",
    )
    embedding_bits: Literal[4, 8] | None = Field(
        None, description="quantize the token-embedding Gather into GatherBlockQuantized (4 or 8 bits); default: float"
    )
    kernel: Literal["ort", "slimline"] = Field(
        "ort",
        description="ort: ONNX Runtime's MatMulNBits; slimline: 4-bit layers in blocks of 32 go to slimline's own CPU "
        "kernel MatMulQ4 (ai.slimline; `slimline ops build`), whose blocks keep a float16 minimum (GGUF's Q4_1) instead "
        "of an integer zero point: 20 bytes per 32 weights against MatMulNBits' 24 once packed, and Q4_1 source "
        "weights come back exactly; 8-bit layers in blocks of 32 (block_size_8bit: 32) go to MatMulQ8, where Q8_0 "
        "source weights come back exactly. Other layers stay MatMulNBits",
    )
    layers: dict[str, LayerFormat] = Field(
        default_factory=dict,
        description="per-layer formats, by role or node glob: {'role:ffn.out@0': {bits: 8, block_size: 64}}; those "
        "layers skip the fallback (their format is the recipe's choice) and report their error like the rest",
    )

    @field_validator("layers")
    @classmethod
    def _layer_roles(cls, value: dict[str, LayerFormat]) -> dict[str, LayerFormat]:
        roles_are_known(list(value))
        return value

    def block_for(self, bits: int) -> int:
        return self.block_size_8bit if bits == 8 and self.block_size_8bit else self.block_size

    def quantize_weight(
        self, w: np.ndarray, gram: np.ndarray | None, bits: int | None = None, block: int | None = None
    ) -> nbits.Blocked:
        bits = bits or self.bits
        block = block or self.block_for(bits)
        # slimline's MatMulQ4 / MatMulQ8 keep each block's minimum as a float16: the codes are fitted to that grid
        float_min = self.kernel == "slimline" and q4.fits(bits, block, w.shape[0])
        if self.algorithm == "gptq":
            return nbits.gptq(
                w, gram, bits, block, self.symmetric, self.damp, self.act_order, clip=self.clip_search, float_min=float_min
            )
        if self.algorithm == "hqq":
            return nbits.hqq(w, bits, block)
        return nbits.rtn(w, bits, block, self.symmetric, clip=self.clip_search, float_min=float_min)

    @model_validator(mode="after")
    def _options(self) -> WeightOnly:
        if self.fallback_block_size and (self.fallback_block_size >= self.block_size or self.fallback != "auto"):
            raise ValueError(
                f"{self.kind}: fallback_block_size {self.fallback_block_size} needs fallback: auto and a block_size larger "
                f"than it (block_size is {self.block_size}). Use a smaller fallback_block_size or remove it."
            )
        if self.kernel == "slimline" and (self.symmetric or self.algorithm == "hqq"):
            raise ValueError(
                f"{self.kind}: kernel slimline stores a float minimum per block (asymmetric): use algorithm rtn or gptq "
                "with symmetric: false, or kernel: ort."
            )
        if self.algorithm == "hqq" and self.symmetric:
            raise ValueError("quantize.weight_only: HQQ fits asymmetric zero points; set symmetric: false or algorithm: rtn.")
        return self

    def candidates(self, model: Any, ctx: Context) -> tuple[dict[str, tuple[str, np.ndarray]], list[str], set[str]]:
        """The layers this stage quantizes: node name -> (activation input, ``[K, N]`` weight), for every
        MatMul / FusedMatMul with a constant float weight not in ``exclude``; the names of those too small
        to count; and the excluded names."""
        excluded = matching_nodes(model, self.exclude, ctx, self.kind)
        layers, small = {}, []
        for node in model.graph.node:
            if node.op_type in ("MatMul", "FusedMatMul") and node.name not in excluded:
                w = weight_of(model, node)
                if w is None:
                    continue
                if min(w.shape) < 16:  # e.g. the rotary frequency table ([1, d/2]): no weight matrix to speak of
                    small.append(node.name)
                    continue
                layers[node.name] = (node.input[0], w)
        return layers, small, excluded

    def run(self, artifact: OnnxModel, ctx: Context) -> StageResult:
        import onnx

        if self.kernel == "slimline":
            from slimline import ops

            ops.require()  # before any work: the library must be built here (OpsUnavailable names the fix)
        model = onnx.load(str(artifact.path))
        refuse_quantized(model, self.kind)
        layers, small, excluded = self.candidates(model, ctx)
        if not layers:
            raise StageError(
                f"{self.kind}: no MatMul with a constant 2-D float weight to quantize (after `exclude`). "
                "Weight-only quantization replaces MatMul nodes; fused Attention weights are not MatMuls."
            )
        report: dict[str, Any] = {"algorithm": self.algorithm, "bits": self.bits, "block_size": self.block_size}
        if self.block_size_8bit:
            report["block_size_8bit"] = self.block_size_8bit
        model_heads = [n for n in model.graph.node if n.name in layers and "logits" in n.output]
        heads = {n.name for n in model_heads}
        if heads and self.head_bits:
            report["head_bits"] = f"{self.head_bits} ({', '.join(sorted(heads))})"
        for name, (_, w) in layers.items():
            if w.shape[0] % self.block_size:
                ctx.warn(
                    f"{self.kind}: {name} has K={w.shape[0]}, not a multiple of block_size {self.block_size}; "
                    f"its last block is zero-padded. A block_size dividing {w.shape[0]} avoids the padding."
                )

        captured = self._capture(model, artifact, layers, ctx)
        if captured is None and (self.algorithm == "gptq" or self.fallback == "auto"):
            raise StageError(f"{self.kind}: algorithm {self.algorithm} / fallback auto needs calibration data; the run has none.")

        chosen: dict[str, LayerFormat] = {}  # the recipe's own per-layer formats
        for selector, fmt in self.layers.items():
            matched = matching_nodes(model, [selector], ctx, self.kind, key="layers") & set(layers)
            chosen.update({n: fmt for n in matched})
        blocks: dict[str, nbits.Blocked] = {}
        errors: dict[str, float] = {}
        with ctx.reporter.task(f"{self.kind} ({self.algorithm})", total=len(layers)) as step:
            for name, (act, w) in layers.items():
                c = captured[act] if captured else None
                bits, block = (
                    (chosen[name].bits, chosen[name].block_size)
                    if name in chosen
                    else (self.head_bits if name in heads else None, None)
                )
                try:
                    blocks[name] = self.quantize_weight(w, c.gram if c else None, bits, block)
                except ValueError as e:
                    raise StageError(f"{self.kind}: layer {name}: {e}") from e
                if c is not None:
                    x = c.sample
                    errors[name] = relative_error(x @ w, x @ blocks[name].dequantize())
                step.advance()

        shapes = {name: w.shape for name, (_, w) in layers.items()}
        kept = choose_fallback(
            self,
            {n: e for n, e in errors.items() if n not in chosen},
            shapes,
            self._quantize_file,
            ctx,
            ctx.stage_dir("weight_only_kernels"),
        )
        promoted, finer = {}, {}
        for name in list(kept):
            by_error = "slower" not in kept[name] and "not faster" not in kept[name]
            if self.fallback_block_size and by_error and captured and name not in heads:
                # the cheaper rung first: the same bits in smaller blocks, kept only if that is enough
                act, w = layers[name]
                c = captured[act]
                trial = self.quantize_weight(w, c.gram, None, self.fallback_block_size)
                err = relative_error(c.sample @ w, c.sample @ trial.dequantize())
                if err <= self.max_layer_error:
                    blocks[name], errors[name] = trial, err
                    finer[name] = f"{kept.pop(name)}: {self.bits}-bit in blocks of {self.fallback_block_size} instead ({err:.4f})"
                    continue
            if self.fallback_bits and by_error:
                # mixed precision: an error-driven fallback goes to fallback_bits, not all the way to float
                act, w = layers[name]
                c = captured[act] if captured else None
                blocks[name] = self.quantize_weight(w, c.gram if c else None, self.fallback_bits)
                errors[name] = relative_error(c.sample @ w, c.sample @ blocks[name].dequantize()) if c else errors[name]
                promoted[name] = kept.pop(name)
            else:
                blocks.pop(name)
        if not blocks:
            raise StageError(
                f"{self.kind}: fallback kept every layer in float ({len(kept)} layers); nothing was quantized. "
                "Raise max_layer_error, or use more bits / a smaller block_size."
            )
        quantized = replace_matmuls(model, blocks, self.accuracy_level, self.kernel)
        if self.embedding_bits:
            head_bits = self.head_bits or self.bits
            tied = {}
            if head_bits == self.embedding_bits:  # a tied LM head: the Gather reads the head's packed weights
                sources = {n.name: n.input[1] for n in model_heads}
                heads_by_name = {n.name: n for n in quantized.graph.node if n.op_type in ("MatMulNBits", "MatMulQ4", "MatMulQ8")}
                tied = {sources[name]: heads_by_name[name] for name in sources if name in heads_by_name}
            embedding_block = self.block_for(self.embedding_bits)
            for name, err in quantize_embeddings(quantized, self.embedding_bits, embedding_block, tied).items():
                report[f"embedding_error.{name}"] = err if isinstance(err, str) else round(err, 5)
        if self.max_weight_mb:
            for name, parts in split_wide(quantized, int(self.max_weight_mb * 2**20)).items():
                report[f"split.{name}"] = f"{parts} parts (load-time peak memory)"
        replace_matmuls(quantized, {}, self.accuracy_level)  # drops the tables no node reads now
        out = ctx.stage_dir("quantize_weight_only") / "model.onnx"
        quantized = onnxfile.save_stage(quantized, out)
        loads_in_ort(out, self.kind)

        counts = Counter(n.op_type for n in quantized.graph.node)
        report["quantized.MatMulNBits"] = counts["MatMulNBits"]
        for op in ("MatMulQ4", "MatMulQ8", "GatherBlockQuantized", "GatherQ4", "GatherQ8"):
            if counts.get(op):
                report[f"quantized.{op}"] = counts[op]
        report.update({f"float.{op}": counts[op] for op in ("MatMul", "Attention", "EmbedLayerNormalization") if counts.get(op)})
        report["quantized_params"] = int(sum(layers[n][1].size for n in blocks))
        report["excluded_nodes"] = len(excluded)
        if small:
            report["skipped_small"] = ", ".join(small)  # constant MatMuls with K or N < 16, kept float
        report_fallback(report, kept)
        for name, fmt in chosen.items():
            report[f"layers.{name}"] = f"{fmt.bits}-bit in blocks of {blocks[name].block_size} (the recipe's choice)"
        if finer:
            report[f"fallback_block_{self.fallback_block_size}"] = len(finer)
            report.update({f"fallback.{name}": why for name, why in finer.items()})
        if promoted:
            report[f"fallback_{self.fallback_bits}bit"] = len(promoted)
            for name, why in promoted.items():
                report[f"fallback.{name}"] = f"{why}: {self.fallback_bits}-bit instead"
        calib.layer_report({n: e for n, e in errors.items() if n in blocks}, report)
        if not errors:
            ctx.warn(f"{self.kind}: no calibration text, so no per-layer error was measured.")
        worst = sorted((n for n in errors if n in blocks), key=lambda n: -errors[n])
        fidelity_guard(self, artifact, out, ctx, report, worst)
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, artifact.config), report)

    def _capture(self, model: Any, artifact: OnnxModel, layers: dict, ctx: Context) -> dict | None:
        if not ctx.load_data:
            return None
        texts = check_texts(ctx.data.calibration[: self.calibration_texts], self.kind)
        inputs = [i.name for i in model.graph.input]
        feeds = calibration_feeds(artifact.tokenizer, texts, inputs, config=artifact.config)
        acts = sorted({a for a, _ in layers.values()})
        gram = set(acts) if self.algorithm == "gptq" else set()
        return calib.capture(model, acts, feeds, gram=gram, threads=ctx.threads, workdir=ctx.stage_dir("calibration"))

    def _quantize_file(self, src: Path, dst: Path) -> None:
        """Quantize a one-MatMul model the way this stage would: the zero-point type decides the kernel path
        (HQQ's float zero points measured 9 tokens/s against 168 for integer ones on SmolLM2)."""
        import onnx

        m = onnx.load(str(src))
        w = weight_of(m, m.graph.node[0])
        block = self.quantize_weight(w, np.eye(w.shape[0]))
        onnx.save_model(replace_matmuls(m, {"mm": block}, self.accuracy_level, self.kernel), str(dst))
