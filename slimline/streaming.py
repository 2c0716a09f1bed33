"""Decoders of any size to int4 ONNX in bounded memory: trace with fake weights, bind lazily, write as
quantized.

The whole-model path (``compile.export`` -> ``compile.fuse`` -> ``quantize.weight_only``) holds the
float model in torch, then the float ONNX graph, then its quantized copy: several times the fp32 size
(an 8B model is 32 GB in fp32). This path never holds more than one weight:

1. **Trace** the model's graph under torch's ``FakeTensorMode``: the same ``torch.onnx`` export and
   the same graph as the whole-model path, but every parameter is a fake tensor (shape and dtype, no
   storage), so tracing an 8B model costs its graph, not its weights.
2. **Bind** each initializer to its tensor in the safetensors checkpoint as an ``onnx_ir.LazyTensor``
   (``slimline.models.lazy.Checkpoint``, read with ``pread``, never memory-mapped). Buffers computed
   at construction (rotary frequencies) come from the model built with its parameters on the meta
   device. A weight's ``Transpose`` (how the exporter writes ``Linear``) becomes a lazy transposed
   view of the same checkpoint tensor, so no float weight is ever folded in memory.
3. **Optimize and fuse** the graph with the whole-model path's passes (onnxscript's optimizer and
   slimline's fusion rules); they read small constants only. The fusion contract is checked as in
   ``compile.fuse``.
4. **Quantize lazily**: every MatMul with a 2-D weight becomes MatMulNBits whose ``B``, ``scales`` and
   ``zero_points`` are lazy tensors computed from the checkpoint rows when they are written, in chunks
   of output channels (RTN or HQQ; GPTQ's parts come from its layer-by-layer calibration), or, with
   ``kernel="slimline"``, slimline's MatMulQ4 / MatMulQ8 (float minimums, blocks of 32, chunks of 16
   output channels: its column groups); the token embedding becomes an 8-bit GatherBlockQuantized the
   same way.
5. **Write** with onnx_ir's external-data writer, which asks each tensor for its bytes one at a time:
   the peak is one weight's float rows plus its codes. The graph-only passes (unused outputs, lengths
   from the mask, ``logits_to_keep``) run on the saved graph without loading its weights.

The output is written into a hidden folder beside the destination and renamed into place when
complete: a failed or interrupted build (a full disk, a truncated shard) leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimline.errors import ModelError, ResourceError, StageError
from slimline.evaluate.memory import peak_rss_mb
from slimline.models.lazy import Checkpoint, checkpoint_name
from slimline.quantize import nbits

Log = Callable[[str], None]
CHUNK_BYTES = 32 << 20  # float rows quantized at a time (the quantizer holds ~8 temporaries of this size)


def release_memory() -> None:
    """Hand freed heap memory back to the system. glibc raises its mmap threshold after large frees,
    so the next weights' buffers come from the heap and, freed in another order, stay resident: a
    layer-by-layer loop then grows by about a layer's weights per layer. ``malloc_trim`` returns them."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def pin_mmap_threshold(size: int = 4 << 20) -> bool:
    """Serve every allocation of ``size`` bytes or more from its own mapping, returned to the system when
    freed. glibc's default threshold rises after each large free (up to 32 MB), after which GPTQ's
    per-batch activations and weight copies come from the heap and fragment it: the 3B build's peak
    grew by ~100 MB a layer (2.37, 2.47, 2.56 GB after layers 1-3) although each layer's working set is
    the same. Setting the threshold fixes it (glibc's ``mallopt(M_MMAP_THRESHOLD)``); False where the
    C library has no ``mallopt``."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, size))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False


# -- 1. trace ------------------------------------------------------------------------------------


def trace(config: Any, opset: int = 18, attention: dict | None = None) -> Any:
    """The decoder's ONNX graph (onnx_ir.Model, not optimized) with fake weights."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    from slimline.compile.export_llm import export_program
    from slimline.runtime import quiet

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, quiet():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **(attention or {})).eval()
        program = export_program(model, opset, optimize=False, fake_mode=mode)
    return program.model


def real_buffers(config: Any, attention: dict | None = None) -> dict[str, np.ndarray]:
    """The model's buffers as its constructor computes them (rotary frequencies, with the exporter's
    fixed-RoPE treatment), the parameters left on the meta device."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from slimline.compile.export_llm import fixed_rope

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **(attention or {}))
    with fixed_rope(model):
        return {name: b.detach().float().numpy().copy() for name, b in model.named_buffers() if b.device.type != "meta"}


# -- 2. bind -------------------------------------------------------------------------------------


class CheckpointTensor:
    """Where a lazy weight's values come from: checkpoint tensor ``name``, transposed or not. The
    quantizer reads the rows of ``[out, in]`` in chunks through ``rows``; anything else gets the
    whole array."""

    def __init__(self, ckpt: Checkpoint, name: str, transposed: bool = False) -> None:
        self.ckpt, self.name, self.transposed = ckpt, name, transposed

    def array(self) -> np.ndarray:
        value = self.ckpt.read(self.name)
        return np.ascontiguousarray(value.T) if self.transposed else value


def lazy(source: CheckpointTensor, shape: tuple[int, ...]) -> Any:
    import onnx_ir as ir

    tensor = ir.LazyTensor(lambda: ir.tensor(source.array()), dtype=ir.DataType.FLOAT, shape=ir.Shape(shape))
    tensor.slimline_source = source  # type: ignore[attr-defined]
    return tensor


def source_of(value: Any) -> CheckpointTensor | None:
    """The checkpoint tensor behind a lazy initializer (None for a merged one or a computed constant)."""
    return getattr(getattr(value, "const_value", None), "slimline_source", None)


def sources_of(value: Any) -> list[CheckpointTensor] | None:
    """The checkpoint tensors a lazy MatMul weight concatenates along its columns (one, unless merged)."""
    merged = getattr(getattr(value, "const_value", None), "slimline_sources", None)
    if merged is not None:
        return merged
    single = source_of(value)
    return None if single is None else [single]


def merge_siblings(model: Any) -> int:
    """MatMuls that read one input with lazy weights of the same K -> one MatMul over the concatenated
    weight and a Split, as ``compile.fusions.sibling_matmul`` does on the whole-model path (Q/K/V, then
    packed into GroupQueryAttention; gate/up). The merged weight stays lazy: its quantized parts are
    each source's, one after the other along N (blocks run along K, so each column quantizes exactly
    as it would alone). Returns the groups merged."""
    import onnx_ir as ir

    graph = model.graph
    groups: dict[int, list[Any]] = {}
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or source_of(node.inputs[1]) is None:
            continue
        if len(node.inputs[1].shape) != 2 or node.outputs[0].is_graph_output():
            continue
        groups.setdefault(id(node.inputs[0]), []).append(node)
    merged = 0
    for nodes in groups.values():
        if len(nodes) < 2 or len({int(n.inputs[1].shape[0]) for n in nodes}) != 1:
            continue
        sources = [source_of(n.inputs[1]) for n in nodes]
        widths = [int(n.inputs[1].shape[1]) for n in nodes]
        k = int(nodes[0].inputs[1].shape[0])
        weight = ir.Value(
            name=f"{nodes[0].inputs[1].name}_merged", shape=ir.Shape([k, sum(widths)]), type=ir.TensorType(ir.DataType.FLOAT)
        )
        weight.const_value = ir.LazyTensor(
            lambda sources=sources: ir.tensor(np.concatenate([s.array() for s in sources], axis=1)),
            dtype=ir.DataType.FLOAT,
            shape=ir.Shape([k, sum(widths)]),
        )
        weight.const_value.slimline_sources = sources  # type: ignore[attr-defined]
        sizes = ir.Value(
            name=f"{nodes[0].name}_split_sizes", shape=ir.Shape([len(widths)]), type=ir.TensorType(ir.DataType.INT64)
        )
        sizes.const_value = ir.tensor(np.array(widths, np.int64))
        graph.register_initializer(weight)
        graph.register_initializer(sizes)
        name = "+".join(n.name for n in nodes)
        wide = ir.node("MatMul", [nodes[0].inputs[0], weight], name=name)
        split = ir.node("Split", [wide.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(nodes), name=f"{name}/split")
        graph.insert_before(nodes[0], [wide, split])
        for node, out in zip(nodes, split.outputs, strict=True):
            old = node.outputs[0].name
            node.outputs[0].name = f"{old}_unmerged"
            ir.convenience.replace_all_uses_with(node.outputs[0], out)
            out.name = old
            graph.remove(node, safe=True)
        merged += 1
    _drop_unread(graph)
    return merged


def bind(model: Any, ckpt: Checkpoint, buffers: dict[str, np.ndarray], tied: dict[str, str]) -> dict[str, int]:
    """Give every initializer of the traced graph its value: lazy checkpoint tensors for weights,
    computed buffers as they are. A weight the checkpoint lacks, or has in another shape, is an error
    that names it."""
    import onnx_ir as ir

    counts = {"weights": 0, "buffers": 0}
    for value in list(model.graph.initializers.values()):
        fqn = value.name[len("model.") :] if value.name.startswith("model.") else value.name
        shape = tuple(value.shape.numpy()) if value.shape is not None else ()
        found = checkpoint_name(fqn, ckpt, tied)
        if found is not None:
            have = ckpt.entries[found].shape
            if tuple(have) != shape:
                raise ModelError(
                    f"{ckpt.folder}: tensor `{found}` is {list(have)} in the checkpoint, the config makes it {list(shape)}. "
                    "The config.json does not match the weights."
                )
            value.const_value = lazy(CheckpointTensor(ckpt, found), shape)
            counts["weights"] += 1
        elif fqn in buffers:
            value.const_value = ir.tensor(buffers[fqn].astype(np.float32) if buffers[fqn].dtype == np.float64 else buffers[fqn])
            counts["buffers"] += 1
        else:
            raise ModelError(
                f"{ckpt.folder}: the checkpoint has no tensor `{fqn}`, which this model type needs. Is it a complete "
                "checkpoint of the model its config.json describes?"
            )
    return counts


def fold_transposes(model: Any) -> int:
    """``Transpose(weight)`` -> a lazy transposed weight (what the optimizer would fold, in memory)."""
    import onnx_ir as ir

    graph = model.graph
    done = 0
    for node in list(graph):
        src = source_of(node.inputs[0]) if node.op_type == "Transpose" and node.inputs else None
        perm = node.attributes.get_ints("perm", None) if src is not None else None
        if src is None or list(perm or [1, 0]) != [1, 0] or len(node.inputs[0].shape) != 2:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        rows, cols = node.inputs[0].shape.numpy()
        name = out.name
        out.name = f"{name}_folded"
        fresh = ir.Value(name=name, shape=ir.Shape([cols, rows]), type=ir.TensorType(ir.DataType.FLOAT))
        fresh.const_value = lazy(CheckpointTensor(src.ckpt, src.name, not src.transposed), (cols, rows))
        graph.register_initializer(fresh)
        ir.convenience.replace_all_uses_with(out, fresh)
        graph.remove(node, safe=True)
        done += 1
    _drop_unread(graph)
    return done


def slimline_kernel(kernel: str, bits: int, block: int, k: int, ns: list[int]) -> bool:
    """Whether a weight goes to slimline's MatMulQ4/Q8: asked for, a format they hold, and every source's
    output channels a whole number of the ops' column groups (merged weights are packed source by
    source, chunk by chunk, and the groups must not straddle them)."""
    from slimline.ops import q4

    return kernel == "slimline" and q4.fits(bits, block, k) and all(n % q4.LANES == 0 for n in ns)


def _drop_unread(graph: Any) -> None:
    for value in list(graph.initializers.values()):
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)


# -- 4. lazy quantization ------------------------------------------------------------------------


class _LazyParts:
    """The packed parts of one weight, computed chunk by chunk when the first of them is written and
    dropped once each has been; ``errors[key]`` gets the weight's relative reconstruction error."""

    def __init__(self, errors: dict, key: str) -> None:
        self.errors, self.key = errors, key
        self._parts: dict[str, np.ndarray] = {}

    def _chunks(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _encode(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], nbits.Blocked]:  # pragma: no cover
        raise NotImplementedError

    def compute(self) -> None:
        parts: dict[str, list[np.ndarray]] = {}
        err = ref = 0.0
        for rows in self._chunks():  # [n_chunk, k]: output channels (or table rows) x inputs
            packed, b = self._encode(rows)
            for key, v in packed.items():
                parts.setdefault(key, []).append(v)
            err += float(np.square(rows - b.dequantize().T).sum())
            ref += float(np.square(rows).sum())
        self._parts = {key: np.concatenate(v, axis=0) for key, v in parts.items()}
        self.errors[self.key] = math.sqrt(err / ref) if ref > 0 else 0.0

    def part(self, key: str) -> np.ndarray:
        if key not in self._parts:
            self.compute()
        value = self._parts.pop(key)
        if not self._parts:
            release_memory()
        return value


class Quantized(_LazyParts):
    """A MatMul weight's MatMulNBits parts (``B``, ``scales``, ``zero_points``), or MatMulQ4/Q8's (``B``,
    ``scales``, ``mins``)."""

    def __init__(
        self,
        sources: list[CheckpointTensor],
        n: int,
        k: int,
        bits: int,
        block: int,
        algorithm: str,
        errors: dict,
        key: str,
        slimline: bool = False,
    ) -> None:
        super().__init__(errors, key)
        self.sources, self.n, self.k, self.bits, self.block, self.algorithm = sources, n, k, bits, block, algorithm
        self.slimline = slimline  # MatMulQ4/Q8's parts (slimline_kernel), else MatMulNBits'
        self.store: Calibrated | None = None

    def compute(self) -> None:
        """GPTQ's parts from the calibration pass when it covered every source, else RTN/HQQ now."""
        if self.store is None or not all(s.name in self.store.paths for s in self.sources):
            super().compute()
            return
        parts: dict[str, list[np.ndarray]] = {}
        for src in self.sources:
            with np.load(self.store.paths[src.name]) as saved:
                for key in saved.files:
                    parts.setdefault(key, []).append(saved[key])
        self._parts = {key: np.concatenate(v, axis=0) for key, v in parts.items()}
        self.errors[self.key] = max(self.store.errors[s.name] for s in self.sources)

    def _chunks(self) -> Any:
        """``W^T`` (``[out, in]``) in chunks of output channels. A Linear's checkpoint tensor is already
        ``[out, in]``: its row ranges are contiguous bytes in the file. A Conv1D's (GPT-2) is ``[in, out]``:
        read whole and transposed."""
        step = max(1, CHUNK_BYTES // (4 * self.k))
        if self.slimline:  # whole column groups per chunk
            step = max(16, step // 16 * 16)
        for src in self.sources:  # a merged weight: each source's output channels in turn
            if not src.transposed:
                yield np.ascontiguousarray(src.ckpt.read(src.name).T)
                continue
            rows = src.ckpt.entries[src.name].shape[0]
            for start in range(0, rows, step):
                yield src.ckpt.read(src.name, rows=(start, min(rows, start + step)))

    def _encode(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], nbits.Blocked]:
        if self.slimline:
            b = nbits.rtn(rows.T, self.bits, self.block, float_min=True)
            return nbits.pack_q(b), b
        b = nbits.hqq(rows.T, self.bits, self.block) if self.algorithm == "hqq" else nbits.rtn(rows.T, self.bits, self.block)
        packed = nbits.pack(b)
        if self.algorithm == "hqq" and packed.get("zero_points", b.zero).dtype != np.float32:
            packed["zero_points"] = b.zero.astype(np.float32)  # HQQ's zeros are float, whatever this chunk's
        return packed, b

    def shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        import onnx_ir as ir

        blocks = -(-self.k // self.block)
        if self.slimline:
            groups = -(-self.n // 16)
            return {
                "B": ((groups, blocks, 64 * self.bits), ir.DataType.UINT8),
                "scales": ((groups, blocks, 16), ir.DataType.FLOAT16),
                "mins": ((groups, blocks, 16), ir.DataType.FLOAT16),
            }
        out = {
            "B": ((self.n, blocks, self.block * self.bits // 8), ir.DataType.UINT8),
            "scales": ((self.n, blocks), ir.DataType.FLOAT),
        }
        if self.algorithm == "hqq":
            out["zero_points"] = ((self.n, blocks), ir.DataType.FLOAT)
        elif self.bits == 4:
            out["zero_points"] = ((self.n, -(-blocks // 2)), ir.DataType.UINT8)
        else:
            out["zero_points"] = ((self.n, blocks), ir.DataType.UINT8)
        return out


def _lazy_part(q: Quantized, key: str, shape: tuple[int, ...], dtype: Any) -> Any:
    import onnx_ir as ir

    return ir.LazyTensor(lambda: ir.tensor(q.part(key)), dtype=dtype, shape=ir.Shape(shape))


def quantize_matmuls(
    model: Any,
    bits: int,
    block: int,
    algorithm: str,
    head_bits: int,
    accuracy_level: int,
    errors: dict,
    store: Calibrated | None = None,
    kernel: str = "ort",
) -> dict[str, int]:
    """Every MatMul with a lazy 2-D weight -> MatMulNBits (or, ``kernel`` "slimline", MatMulQ4/Q8 where
    ``slimline_kernel`` says they hold it) with lazy parts."""
    import onnx_ir as ir

    from slimline.ops import DOMAIN, q4

    graph = model.graph
    counts = {"MatMulNBits": 0, "float_weights": 0}
    for node in list(graph):
        if node.op_type != "MatMul":
            continue
        src = sources_of(node.inputs[1])
        if src is None or len(node.inputs[1].shape) != 2:
            counts["float_weights"] += int(node.inputs[1].const_value is not None)
            continue
        k, n = node.inputs[1].shape.numpy()
        head = any(o.is_graph_output() and o.name == "logits" for o in node.outputs)
        nb = head_bits if head else bits
        if k % 2:
            counts["float_weights"] += 1
            continue
        label = node.name or node.outputs[0].name
        nblock, calibrated = block, None
        if store is not None and all(s.name in store.paths for s in src):
            widths = {store.bits[s.name] for s in src}
            if len(widths) == 1:  # GPTQ covered every source at one width (a fallback moves a whole group)
                (nb, nblock), calibrated = widths.pop(), store
        ours = slimline_kernel(kernel, nb, nblock, int(k), [s.ckpt.entries[s.name].shape[0 if s.transposed else 1] for s in src])
        if calibrated is not None and ours != all(calibrated.slimline.get(s.name, False) for s in src):
            calibrated = None  # GPTQ packed these sources for the other kernel (sources of mixed widths): RTN here
            counts["gptq_replaced_by_rtn"] = counts.get("gptq_replaced_by_rtn", 0) + 1
        q = Quantized(src, int(n), int(k), nb, nblock, "rtn" if algorithm == "gptq" else algorithm, errors, label, ours)
        q.store = calibrated
        counts["bits8"] = counts.get("bits8", 0) + int(nb == 8)
        inputs = [node.inputs[0]]
        for key, (shape, dtype) in q.shapes().items():
            v = ir.Value(name=f"{label}_q{nb}_{key}", shape=ir.Shape(shape), type=ir.TensorType(dtype))
            v.const_value = _lazy_part(q, key, shape, dtype)
            graph.register_initializer(v)
            inputs.append(v)
        if ours:
            op = q4.matmul_op(nb)
            attrs = {"K": int(k), "N": int(n), "block_size": nblock}
            new = ir.node(op, inputs, attributes=attrs, domain=DOMAIN, name=node.name, num_outputs=1)
            model.opset_imports.setdefault(DOMAIN, 1)
        else:
            op = "MatMulNBits"
            attrs = {"K": int(k), "N": int(n), "bits": nb, "block_size": nblock}
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            new = ir.node(op, inputs, attributes=attrs, domain="com.microsoft", name=node.name, num_outputs=1)
        graph.insert_before(node, new)
        name = node.outputs[0].name
        node.outputs[0].name = f"{name}_float"
        ir.convenience.replace_all_uses_with(node.outputs[0], new.outputs[0], replace_graph_outputs=True)
        new.outputs[0].name = name
        graph.remove(node, safe=True)
        counts[op] = counts.get(op, 0) + 1
    model.opset_imports.setdefault("com.microsoft", 1)
    _drop_unread(graph)
    return counts


class _EmbeddingParts(_LazyParts):
    """A token-embedding table's 8-bit GatherBlockQuantized parts, blocks along the hidden axis."""

    def __init__(self, src: CheckpointTensor, vocab: int, hidden: int, block: int, errors: dict, key: str) -> None:
        super().__init__(errors, key)
        self.src, self.vocab, self.hidden, self.block = src, vocab, hidden, block

    def _chunks(self) -> Any:
        step = max(1, CHUNK_BYTES // (4 * self.hidden))
        for start in range(0, self.vocab, step):
            yield self.src.ckpt.read(self.src.name, rows=(start, min(self.vocab, start + step)))

    def _encode(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], nbits.Blocked]:
        b = nbits.rtn(np.ascontiguousarray(rows.T), 8, self.block)  # q: [rows, hidden]
        return {"data": b.q.astype(np.uint8), "scale": b.scale.astype(np.float32), "zero": b.zero.astype(np.uint8)}, b


def quantize_embedding(model: Any, block: int, errors: dict) -> int:
    """The token-embedding Gather (a lazy ``[vocab, hidden]`` table, axis 0) -> 8-bit GatherBlockQuantized."""
    import onnx_ir as ir

    graph = model.graph
    done = 0
    for node in list(graph):
        src = source_of(node.inputs[0]) if node.op_type == "Gather" else None
        if src is None or src.transposed or node.attributes.get_int("axis", 0) != 0 or len(node.inputs[0].shape) != 2:
            continue
        vocab, hidden = (int(d) for d in node.inputs[0].shape.numpy())
        if hidden % block:
            continue
        label = node.name or node.outputs[0].name
        parts = _EmbeddingParts(src, vocab, hidden, block, errors, label)
        shapes = {
            "data": ((vocab, hidden), ir.DataType.UINT8),
            "scale": ((vocab, hidden // block), ir.DataType.FLOAT),
            "zero": ((vocab, hidden // block), ir.DataType.UINT8),
        }
        values = {}
        for key, (shape, dtype) in shapes.items():
            v = ir.Value(name=f"{label}_q8_{key}", shape=ir.Shape(shape), type=ir.TensorType(dtype))
            v.const_value = ir.LazyTensor(
                lambda key=key, parts=parts: ir.tensor(parts.part(key)), dtype=dtype, shape=ir.Shape(shape)
            )
            graph.register_initializer(v)
            values[key] = v
        new = ir.node(
            "GatherBlockQuantized",
            [values["data"], node.inputs[1], values["scale"], values["zero"]],
            attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": 8},
            domain="com.microsoft",
            name=node.name,
        )
        graph.insert_before(node, new)
        ir.convenience.replace_all_uses_with(node.outputs[0], new.outputs[0])
        graph.remove(node, safe=True)
        done += 1
    _drop_unread(graph)
    return done


# -- 3b. GPTQ: calibration carried layer by layer ----------------------------------------------


class _Hessians:
    """``X^T X`` of each Linear's inputs over the calibration batches, one per distinct input tensor."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.alias: dict[str, str] = {}
        self.seen: dict[int, tuple[str, Any]] = {}

    def new_batch(self) -> None:
        self.seen.clear()

    def hook(self, name: str) -> Callable:
        def accumulate(module: Any, args: tuple) -> None:
            x = args[0]
            first = self.seen.get(id(x))
            if first is not None and first[1] is x:  # Q/K/V (gate/up) read the same tensor: one Hessian
                self.alias[name] = first[0]
                return
            # holding the tensor until the batch ends keeps its id (and memory) from being reused by a
            # later input of this layer, which would otherwise pass for the same one
            self.seen[id(x)] = (name, x)
            flat = x.reshape(-1, x.shape[-1]).float()
            contribution = flat.T @ flat
            if flat.shape[1] <= nbits.F64_MAX_K:  # summed in float64 where GPTQ factorizes in float64
                contribution = contribution.double()
            if name in self.sums:
                self.sums[name] += contribution
            else:
                self.sums[name] = contribution

        return accumulate

    def key(self, name: str) -> str:
        return self.alias.get(name, name)

    def of(self, name: str) -> np.ndarray:
        return self.sums[self.key(name)].numpy()

    def drop(self, name: str) -> None:
        """Free one input's Hessian once its group is quantized (a 3B model's down_proj: 256 MB)."""
        self.sums.pop(self.key(name), None)


class Calibrated:
    """GPTQ's packed parts per checkpoint tensor, in ``.npz`` files under a scratch folder, with the bit
    width and block size each was quantized with and its relative output error."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[str, Path] = {}
        self.bits: dict[str, tuple[int, int]] = {}
        self.errors: dict[str, float] = {}
        self.slimline: dict[str, bool] = {}  # packed for MatMulQ4/Q8 (slimline_kernel), else MatMulNBits
        self.fallbacks = 0


def error_terms(weight: np.ndarray, b: nbits.Blocked, hessian: np.ndarray, rows: int = 256) -> tuple[float, float]:
    """``tr(dW H dW^T)`` and ``tr(W H W^T)`` of a ``[out, in]`` weight's rounding, ``H = X^T X``: the
    squared output error over the calibration inputs and the squared output, with no forward pass.
    Summed over ``rows`` output rows at a time, in float64: the temporaries stay a few MB where whole
    matrices would be four copies of the weight in float64 (800 MB for a 3B model's down_proj)."""
    import torch

    h = torch.from_numpy(hessian)
    num = den = 0.0
    for start in range(0, weight.shape[0], rows):
        stop = min(start + rows, weight.shape[0])
        w = torch.from_numpy(weight[start:stop]).to(h.dtype)
        d = w - torch.from_numpy(b.rows(start, stop)).to(h.dtype)
        num += float(((d @ h).double() * d.double()).sum())
        den += float(((w @ h).double() * w.double()).sum())
    return max(num, 0.0), den


def output_error(weight: np.ndarray, b: nbits.Blocked, hessian: np.ndarray) -> float:
    """Relative output error ``sqrt(tr(dW H dW^T) / tr(W H W^T))`` of a weight's rounding."""
    num, den = error_terms(weight, b, hessian)
    return math.sqrt(num / den) if den > 0 else 0.0


def calibration_windows(folder: Path, vocab: int, windows: int, length: int, log: Log) -> np.ndarray:
    """``[windows, length]`` token ids: the calibration plays of the built-in Shakespeare, tokenized with
    the model's tokenizer and cut into windows; random ids when the folder has no tokenizer."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - no tokenizer files, or ones transformers cannot read
        log("gptq: the model folder has no tokenizer; calibrating on random token ids")
        return np.random.default_rng(0).integers(0, vocab, (windows, length))
    from slimline.measure.data import load_shakespeare

    text = "\n".join(load_shakespeare(100_000, 0).calibration)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(windows, len(ids) // length)
    return np.asarray(ids[: n * length], np.int64).reshape(n, length)


def _decoder_layers(model: Any, count: int) -> Any:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise StageError(f"gptq: no list of {count} decoder layers in this model; use --algorithm rtn or hqq.")


def calibrate_gptq(
    folder: Path,
    ckpt: Checkpoint,
    bits: int,
    block: int,
    scratch: Path,
    *,
    windows: int = 128,
    length: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    clip: bool = False,
    max_layer_error: float | None = None,
    fallback_bits: int = 8,
    fallback_block: int = 64,
    head_bits: int | None = None,
    kernel: str = "ort",
    log: Log = print,
) -> Calibrated:
    """GPTQ every Linear of every decoder layer, one layer in memory at a time.

    The calibration windows run through the embeddings up to the first layer (transformers' own
    forward, module by module, ``SequentialModel``); from there the hidden states are carried layer by
    layer. In each layer the inputs of its Linears give their Hessians ``X^T X`` (one per distinct
    input: Q/K/V share one, gate/up another); each weight is quantized with GPTQ and its packed parts
    saved; the layer then runs again with the quantized weights, and its outputs are the next layer's
    inputs, so each layer is calibrated on what the quantized model before it really produces. The
    peak is one layer's weights, its Hessians, the GPTQ temporaries of one weight and the hidden states
    (windows x length x hidden, in float32). The LM head is calibrated last, on the final norm of the
    hidden states (``_gptq_head``); the embedding stays RTN."""
    import torch

    from slimline.models.sequential import SequentialModel

    pin_mmap_threshold()
    sequential = SequentialModel(folder, ckpt)
    config = sequential.config
    count = getattr(config, "num_hidden_layers", None) or config.n_layer
    layers = _decoder_layers(sequential.model, count)
    ids = calibration_windows(folder, config.vocab_size, windows, length, log)
    captured: list[tuple[Any, dict]] = []

    class _Stop(Exception):
        pass

    def catch(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    batch = 4
    embeds = embed_rows(sequential, ckpt, ids)  # the table read once in row chunks, never whole in float32
    for start in range(0, len(ids), batch):
        try:
            with torch.no_grad():
                sequential.model(inputs_embeds=torch.from_numpy(embeds[start : start + batch]), use_cache=False)
        except _Stop:
            pass
    del embeds
    handle.remove()
    hidden = [h for h, _ in captured]
    kwargs = [k for _, k in captured]
    store = Calibrated(scratch)
    t0 = time.perf_counter()
    for i, layer in enumerate(layers):
        prefix = next(n for n, m in sequential.model.named_modules() if m is layer)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        hessians = _Hessians()
        handles = [m.register_forward_pre_hook(hessians.hook(n)) for n, m in linears.items()]
        with torch.no_grad():
            for b in range(len(hidden)):
                hessians.new_batch()
                layer(hidden[b], **kwargs[b])
        for h in handles:
            h.remove()
        rounded: dict[str, nbits.Blocked] = {}  # codes, not float copies: dequantized as the layer reads them
        groups: dict[str, list[str]] = {}  # Linears reading one input: merged into one MatMulNBits later
        for name in linears:
            groups.setdefault(hessians.key(name), []).append(name)
        for key, names in groups.items():
            hessian = hessians.of(key)
            weights = {n: ckpt.read(sequential.names_of(linears[n])["weight"]) for n in names}  # [out, in]
            nb, nblock = bits, block
            gptq = dict(damp=damp, act_order=act_order, clip=clip, kernel=kernel)
            results, ours = _gptq_group(weights, hessian, nb, nblock, **gptq)
            errors = {n: output_error(weights[n], results[n], hessian) for n in names}
            if max_layer_error is not None and max(errors.values()) > max_layer_error:
                # the whole group in fallback_bits: it becomes one MatMulNBits, with one bit width
                nb, nblock = fallback_bits, fallback_block
                results, ours = _gptq_group(weights, hessian, nb, nblock, **gptq)
                errors = {n: output_error(weights[n], results[n], hessian) for n in names}
                store.fallbacks += len(names)
            for n in names:
                stored = sequential.names_of(linears[n])["weight"]
                path = scratch / f"{stored}.npz"
                np.savez(path, **nbits.pack_for(results[n], ours[n]))
                store.slimline[stored] = ours[n]
                store.paths[stored], store.bits[stored] = path, (nb, nblock)
                store.errors[stored] = errors[n]
                rounded[f"{prefix}.{n}.weight"] = results[n]
            del weights, results, hessian
            hessians.drop(key)
        del hessians
        sequential.transform = lambda name, value, rounded=rounded: (
            np.ascontiguousarray(rounded[name].dequantize().T) if name in rounded else value
        )
        with torch.no_grad():
            for b in range(len(hidden)):
                out = layer(hidden[b], **kwargs[b])
                hidden[b] = out[0] if isinstance(out, tuple) else out
        sequential.transform = None
        release_memory()
        log(
            f"gptq: layer {i + 1}/{len(layers)} ({len(linears)} weights) in {time.perf_counter() - t0:.0f}s, peak RSS {peak_rss_mb():,.0f} MB"
        )
    _gptq_head(sequential, ckpt, hidden, store, head_bits or bits, block, damp, act_order, clip, log, kernel)
    return store


def _gptq_group(
    weights: dict[str, np.ndarray],
    hessian: np.ndarray,
    bits: int,
    block: int,
    *,
    damp: float,
    act_order: bool,
    clip: bool,
    kernel: str,
) -> tuple[dict[str, nbits.Blocked], dict[str, bool]]:
    """GPTQ of the ``[out, in]`` weights that read one input (one Hessian), each fitted with float minimums
    where it goes to slimline's kernel (``slimline_kernel``): (results, which went there)."""
    ours = {n: slimline_kernel(kernel, bits, block, w.shape[1], [w.shape[0]]) for n, w in weights.items()}
    results = {
        n: nbits.gptq(w.T, hessian, bits, block, damp=damp, act_order=act_order, clip=clip, float_min=ours[n])
        for n, w in weights.items()
    }
    return results, ours


def embed_rows(sequential: Any, ckpt: Checkpoint, ids: np.ndarray) -> np.ndarray:
    """The input embeddings of ``ids`` (``[..., hidden]``, float32), what the model's embedding module would
    return, read from the checkpoint one chunk of rows at a time: onloading the module would hold the
    whole table in float32 (a 3B Llama's: 1.6 GB, twice while it is converted) for every batch. A scaled
    embedding (Gemma's ``embed_scale``) is scaled the same way."""
    module = sequential.model.get_input_embeddings()
    name = sequential.names_of(module)["weight"]
    rows, hidden = ckpt.entries[name].shape
    out = np.zeros((*ids.shape, hidden), np.float32)
    step = max(1, CHUNK_BYTES // (4 * hidden))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        hit = (ids >= start) & (ids < stop)
        if hit.any():
            out[hit] = ckpt.read(name, rows=(start, stop))[ids[hit] - start]
    scale = getattr(module, "embed_scale", None)
    if scale is not None:
        out *= float(scale)
    return out


def _gptq_head(
    sequential: Any,
    ckpt: Checkpoint,
    hidden: list,
    store: Calibrated,
    bits: int,
    block: int,
    damp: float,
    act_order: bool,
    clip: bool,
    log: Log,
    kernel: str = "ort",
) -> None:
    """GPTQ of the LM head on the final norm of the carried hidden states. The head is where a 4-bit
    rounding reaches the logits directly: on SmolLM2 an RTN int4 head cost +10 points of perplexity
    that an 8-bit one did not. Its rows go through GPTQ in chunks (an 8B model's head is 128k x 4096:
    in float64 at once, 4 GB), each with the same Hessian."""
    import torch

    head = sequential.model.get_output_embeddings()
    base = getattr(sequential.model, "base_model", None)
    norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
    if head is None or norm is None or not isinstance(head, torch.nn.Linear):
        log("gptq: no final norm and Linear head found; the LM head stays RTN")
        return
    total = None
    with torch.no_grad():
        for h in hidden:
            x = norm(h).reshape(-1, h.shape[-1]).float()
            part = (x.T @ x).double()
            total = part if total is None else total + part
    hessian = total.numpy()
    stored = sequential.names_of(head)["weight"]
    rows, k = ckpt.entries[stored].shape
    step = max(1, CHUNK_BYTES // (4 * k))
    ours = slimline_kernel(kernel, bits, block, k, [rows])
    if ours:  # whole column groups per chunk
        step = max(16, step // 16 * 16)
    parts: dict[str, list[np.ndarray]] = {}
    num = den = 0.0
    for start in range(0, rows, step):
        w = ckpt.read(stored, rows=(start, min(rows, start + step)))
        b = nbits.gptq(w.T, hessian, bits, block, damp=damp, act_order=act_order, clip=clip, float_min=ours)
        for key, v in nbits.pack_for(b, ours).items():
            parts.setdefault(key, []).append(v)
        chunk_num, chunk_den = error_terms(w, b, hessian)
        num, den = num + chunk_num, den + chunk_den
    path = store.folder / f"{stored}.head.npz"
    np.savez(path, **{k: np.concatenate(v, axis=0) for k, v in parts.items()})
    store.paths[stored], store.bits[stored] = path, (bits, block)
    store.slimline[stored] = ours
    store.errors[stored] = math.sqrt(num / den) if den > 0 else 0.0
    release_memory()
    log(f"gptq: LM head ({rows} x {ckpt.entries[stored].shape[1]}) output error {store.errors[stored]:.4f}")


# -- 5. estimate, write --------------------------------------------------------------------------


def estimate(
    ckpt: Checkpoint,
    config: Any,
    bits: int,
    block: int,
    embedding_bits: int | None,
    algorithm: str = "rtn",
    windows: int = 0,
    length: int = 0,
) -> dict[str, float]:
    """Before compute: the output size and this process's peak memory, from the checkpoint's shapes.

    Peak: the libraries and the graph (~1.2 GB) + one weight's packed parts (twice, while written) +
    one chunk of rows and the quantizer's temporaries. GPTQ adds the larger of a layer's Hessians (one
    per distinct input) and down_proj's GPTQ working set, and the calibration hidden states (twice,
    while a layer runs)."""
    largest = max(e.numel for e in ckpt.entries.values())
    out = 0.0
    for name, e in ckpt.entries.items():
        if len(e.shape) == 2 and min(e.shape) > 1:
            b = (embedding_bits or 32) if ("embed" in name or name.endswith("wte.weight")) else bits
            out += e.numel * (b / 8 + 5 / block)
            if b != bits and getattr(config, "tie_word_embeddings", False):  # the tied head's own int4 copy
                out += e.numel * (bits / 8 + 5 / block)
        else:
            out += e.numel * 4
    chunk = min(largest * 4, CHUNK_BYTES)
    peak = 1.2e9 + largest * (bits / 8 + 5 / block) * 2 + chunk * 6
    if algorithm == "gptq":
        per_layer: dict[str, list[int]] = {}
        for name, e in ckpt.entries.items():
            parts = name.split(".")
            if "layers" in parts and len(e.shape) == 2:
                key = ".".join(parts[: parts.index("layers") + 2])
                per_layer.setdefault(key, []).append(e.numel)
        layer = max((sum(v) for v in per_layer.values()), default=0)
        widest = max((max(v) for v in per_layer.values()), default=0)
        hidden = getattr(config, "hidden_size", 0)
        inner = getattr(config, "intermediate_size", 0) or 4 * hidden

        def square(k: int) -> int:  # one K x K matrix: float64 up to nbits.F64_MAX_K, float32 beyond
            return k * k * (8 if k <= nbits.F64_MAX_K else 4)

        # after a layer's capture pass: its four Hessians (attention in, o_proj in, mlp in, down_proj in) and
        # one Linear's float weights (the modules onload one at a time); while down_proj is quantized: its
        # Hessian, GPTQ's two K x K and the weight it updates, and the layer's codes so far
        capture = 3 * square(hidden) + square(inner) + widest * 4
        down = 3 * square(inner) + widest * (8 if inner <= nbits.F64_MAX_K else 4) + widest * 4 + layer
        peak += max(capture, down) + windows * length * hidden * 4 * 2
    return {"output_mb": out / 1e6, "peak_mb": peak / 1e6, "largest_tensor_mb": largest * 4 / 1e6}


def _available_memory_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def check_fits(guess: dict[str, float], out_dir: Path) -> None:
    free_disk = shutil.disk_usage(out_dir).free / 1e6
    if guess["output_mb"] * 1.05 > free_disk:
        raise ResourceError(
            f"stream: the artifact will take about {guess['output_mb']:,.0f} MB and {out_dir} has {free_disk:,.0f} MB free. "
            "Free disk space or write to another disk (--out)."
        )
    memory = _available_memory_mb()
    if memory is not None and guess["peak_mb"] > memory:
        raise ResourceError(
            f"stream: the build needs about {guess['peak_mb']:,.0f} MB of memory at its peak and {memory:,.0f} MB is available. "
            "Close other programs, or run it on a machine with more memory."
        )


def graph_passes(path: Path) -> dict[str, int]:
    """The fusion's graph-only passes and ``logits_to_keep``, on the saved graph (weights stay on disk)."""
    import onnx

    from slimline.compile.export_llm import add_logits_to_keep
    from slimline.compile.fusions import gqa_lengths, sibling_matmul, unused_outputs

    proto = onnx.load(str(path), load_external_data=False)
    done = {
        "dropped_unused_outputs": unused_outputs.drop_unused_outputs(proto),
        "packed_qkv_attention": sibling_matmul.pack_attention_inputs(proto),
        "gqa_lengths_from_mask": gqa_lengths.lengths_from_mask(proto),
        "logits_to_keep": int(add_logits_to_keep(proto)),
    }
    onnx.save_model(proto, str(path))
    return done


def build(
    folder: Path | str,
    out: Path | str,
    *,
    bits: int | None = 4,
    block_size: int = 32,
    algorithm: str = "rtn",
    head_bits: int | None = None,
    embedding_bits: int | None = 8,
    accuracy_level: int = 4,
    shard_mb: int | None = None,
    calibration_windows: int = 128,
    calibration_length: int = 128,
    clip_search: bool = False,
    max_layer_error: float | None = None,
    kernel: str = "ort",
    log: Log = print,
) -> dict[str, Any]:
    """Safetensors decoder folder -> fused int4 ONNX decoder in ``out`` (a new folder). Returns the report.
    ``bits=None`` writes the fused float graph (the same graph and weights as compile.export + compile.fuse).
    ``kernel="slimline"``: 4- and 8-bit weights in blocks of 32 go to slimline's MatMulQ4/Q8 (float
    minimums; the op library must be built), the rest to MatMulNBits."""
    import onnx_ir as ir
    from transformers import AutoConfig

    from slimline.compile.fusions import fuse_model
    from slimline.family import KNOWN_DECODERS, expected_fusions, family_of
    from slimline.models.loader import attention_kwargs
    from slimline.runfolder import make_hidden_dir

    folder, out = Path(folder), Path(out)
    if algorithm not in ("rtn", "hqq", "gptq"):
        raise StageError(
            f"stream: algorithm `{algorithm}`: the streaming path quantizes with rtn or hqq (GPTQ needs the layer-by-layer calibration, not built yet)."
        )
    if out.exists():
        raise StageError(f"stream: {out} exists; slimline does not overwrite it. Choose a new --out or remove it yourself.")
    if kernel == "slimline":
        if algorithm == "hqq":
            raise StageError(
                "stream: kernel slimline stores float minimums fitted by rtn or gptq; use one of those, or kernel ort for hqq."
            )
        from slimline import ops

        ops.require()  # before any work: OpsUnavailable names the fix
    elif kernel != "ort":
        raise StageError(f"stream: kernel `{kernel}`: use ort (MatMulNBits) or slimline (MatMulQ4/Q8).")
    t_all = time.perf_counter()
    times: dict[str, float] = {}
    report: dict[str, Any] = {
        "options": {
            "clip_search": clip_search,
            "max_layer_error": max_layer_error,
            "bits": bits,
            "block_size": block_size,
            "algorithm": algorithm,
            "head_bits": head_bits,
            "embedding_bits": embedding_bits if bits else None,
            "accuracy_level": accuracy_level,
            "kernel": kernel,
        }
    }
    ckpt = Checkpoint(folder)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in KNOWN_DECODERS:
        raise StageError(f"stream: model type `{config.model_type}` is not a supported decoder ({', '.join(KNOWN_DECODERS)}).")
    out.parent.mkdir(parents=True, exist_ok=True)
    guess = estimate(
        ckpt, config, bits or 32, block_size, embedding_bits if bits else None, algorithm, calibration_windows, calibration_length
    )
    report.update({f"estimate.{k}": round(v, 1) for k, v in guess.items()})
    log(
        f"checkpoint: {len(ckpt.entries)} tensors, {ckpt.numel / 1e9:.2f}B parameters, {ckpt.nbytes / 1e9:.2f} GB; "
        f"estimated output {guess['output_mb']:,.0f} MB, peak memory {guess['peak_mb']:,.0f} MB"
    )
    check_fits(guess, out.parent)

    attention = attention_kwargs(folder)
    t = time.perf_counter()
    model = trace(config, 18, attention)
    times["trace"] = time.perf_counter() - t
    log(f"traced with fake weights in {times['trace']:.1f}s: {sum(1 for _ in model.graph)} nodes")

    t = time.perf_counter()
    buffers = real_buffers(config, attention)
    tied = {"lm_head.weight": _input_embedding_name(config, ckpt)} if getattr(config, "tie_word_embeddings", False) else {}
    report.update({f"bound.{k}": v for k, v in bind(model, ckpt, buffers, tied).items()})
    report["folded_transposes"] = fold_transposes(model)
    from onnxscript.optimizer import optimize_ir

    optimize_ir(model)
    result = fuse_model(model)
    times["fuse"] = time.perf_counter() - t
    report.update({f"fused.{op}": n for op, n in result.counts.items()})
    contract, how = expected_fusions(family_of("text-generation"), config)
    short = {op: (n, result.counts.get(op, 0)) for op, n in contract.items() if result.counts.get(op, 0) < n}
    report["contract"] = "met" if not short else "failed"
    if short:
        raise StageError(
            "stream: the fusion contract is not met ("
            + ", ".join(f"{op}: expected {w}, got {g}" for op, (w, g) in short.items())
            + f"; {how}). The layers would run unfused."
        )
    log(f"fused in {times['fuse']:.1f}s: " + ", ".join(f"{op} {n}" for op, n in result.counts.items() if n))

    report["merged_sibling_matmuls"] = merge_siblings(model)
    staging = make_hidden_dir(out.parent, f".{out.name}.partial-")
    store = None
    if bits and algorithm == "gptq":
        t = time.perf_counter()
        try:
            (staging / ".gptq").mkdir()
            store = calibrate_gptq(
                folder,
                ckpt,
                bits,
                block_size,
                staging / ".gptq",
                windows=calibration_windows,
                length=calibration_length,
                clip=clip_search,
                max_layer_error=max_layer_error,
                head_bits=head_bits,
                kernel=kernel,
                log=log,
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        times["gptq"] = time.perf_counter() - t
        report["gptq.weights"] = len(store.paths)
        report["gptq.fallback_weights"] = store.fallbacks
        report["gptq.output_error.max"] = round(max(store.errors.values()), 5) if store.errors else None
    errors: dict[str, float] = {}
    counts = (
        quantize_matmuls(model, bits, block_size, algorithm, head_bits or bits, accuracy_level, errors, store, kernel)
        if bits
        else {}
    )
    if bits and embedding_bits:
        counts["GatherBlockQuantized"] = quantize_embedding(model, max(block_size, 64), errors)
    report.update({f"quantized.{k}": v for k, v in counts.items()})

    try:
        t = time.perf_counter()
        total = sum(1 for _ in model.graph.initializers)
        state = {"n": 0, "last": time.perf_counter(), "bytes": 0}

        def progress(tensor: Any, info: Any) -> None:
            state["n"] += 1
            state["bytes"] += tensor.nbytes
            if time.perf_counter() - state["last"] > 15:
                state["last"] = time.perf_counter()
                log(f"writing: {state['n']}/{total} tensors, {state['bytes'] / 1e6:,.0f} MB, peak RSS {peak_rss_mb():,.0f} MB")

        path = staging / "model.onnx"
        ir.save(
            model,
            path,
            external_data="model.onnx.data",
            callback=progress,
            max_shard_size_bytes=shard_mb * 1_000_000 if shard_mb else None,
            alignment=4096,
        )
        times["quantize_write"] = time.perf_counter() - t
        report.update({f"pass.{k}": v for k, v in graph_passes(path).items()})
        shutil.rmtree(staging / ".gptq", ignore_errors=True)
        config.save_pretrained(staging)
        _copy_tokenizer(folder, staging)
        size = sum(p.stat().st_size for p in staging.iterdir() if p.name.startswith("model.onnx"))
        _finish(report, errors, size, times, t_all)
        (staging / "build.json").write_text(json.dumps(report, indent=2))
        os.rename(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise ResourceError(
            f"stream: writing {out} failed ({err.strerror or err}); nothing was kept. Free disk space and run again."
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {out} ({report['output_mb']:,.0f} MB) in {times['quantize_write']:.0f}s; peak RSS {peak_rss_mb():,.0f} MB")
    return report


def _finish(report: dict, errors: dict[str, float], size: int, times: dict[str, float], t_all: float) -> None:
    values = list(errors.values())
    worst = max(errors, key=errors.get) if errors else None
    report.update(
        {
            "output_mb": round(size / 1e6, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "weight_error.mean": round(float(np.mean(values)), 5) if values else None,
            "weight_error.max": round(errors[worst], 5) if worst else None,
            "weight_error.worst": worst,
            **{f"time.{k}_s": round(v, 1) for k, v in times.items()},
            "time.total_s": round(time.perf_counter() - t_all, 1),
        }
    )


def _input_embedding_name(config: Any, ckpt: Checkpoint) -> str:
    for name in ckpt.names():
        if name.endswith("embed_tokens.weight") or name.endswith("wte.weight"):
            return name
    raise ModelError(
        f"{ckpt.folder}: the model ties its LM head to the token embedding, and the checkpoint has no embedding table."
    )


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
    ):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def round_trip(
    bits: int, block: int, algorithm: str, embedding_bits: int | None, head_bits: int | None = None, kernel: str = "ort"
) -> Callable:
    """The streaming build's quantization applied to one torch parameter and undone (``[out, in]``
    weights of Linear layers; the token embedding at ``embedding_bits`` in blocks of 64): torch then
    computes with exactly the weights the artifact holds."""

    def rows_through(value: np.ndarray, quantize: Callable) -> np.ndarray:
        step = max(1, CHUNK_BYTES // (4 * value.shape[1]))  # in chunks of rows: the temporaries stay small
        for start in range(0, value.shape[0], step):
            chunk = value[start : start + step]
            value[start : start + step] = quantize(np.ascontiguousarray(chunk.T)).dequantize().T
        return value

    def fn(name: str, value: np.ndarray) -> np.ndarray:
        if value.ndim != 2 or min(value.shape) == 1:
            return value
        if name.endswith("embed_tokens.weight") or name.endswith("wte.weight"):
            if not embedding_bits:
                return value
            return rows_through(value, lambda w: nbits.rtn(w, embedding_bits, max(block, 64)))
        nb = (head_bits or bits) if name.endswith("lm_head.weight") else bits
        if algorithm == "hqq":
            return rows_through(value, lambda w: nbits.hqq(w, nb, block))
        # chunks of rows: a weight's float-minimum fit is per block, so chunking doesn't change it
        ours = slimline_kernel(kernel, nb, block, value.shape[1], [value.shape[0]])
        return rows_through(value, lambda w: nbits.rtn(w, nb, block, float_min=ours))

    return fn


def verify(
    out: Path | str,
    folder: Path | str,
    *,
    perplexity_tokens: int = 0,
    prompts: int = 3,
    prompt_len: int = 32,
    decode_tokens: int = 16,
    threads: int = 0,
    log: Log = print,
) -> dict[str, Any]:
    """The built artifact against transformers on the same weights (``SequentialModel``, module by
    module): logit cosine at every prompt position and top-1 agreement against the float weights, the
    same cosine against the float model computing with the artifact's rounded weights (which isolates
    the graph from the rounding: it should be ~1), and batch-1 decode speed."""
    from transformers import AutoConfig

    from slimline.generate import OnnxDecoder
    from slimline.models.sequential import SequentialModel

    out, folder = Path(out), Path(folder)
    config = AutoConfig.from_pretrained(folder)
    built = json.loads((out / "build.json").read_text()) if (out / "build.json").is_file() else {}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (prompts, prompt_len))
    t = time.perf_counter()
    expected = {"float": SequentialModel(folder).logits(ids)}
    log(f"verify: torch reference on the float weights ({time.perf_counter() - t:.0f}s)")
    options = built.get("options", {})
    if options.get("bits") and options.get("algorithm") in ("rtn", "hqq"):  # GPTQ's rounding depends on its calibration
        t = time.perf_counter()
        rounding = round_trip(
            options["bits"],
            options["block_size"],
            options["algorithm"],
            options.get("embedding_bits"),
            options.get("head_bits"),
            options.get("kernel", "ort"),
        )
        expected["rounded"] = SequentialModel(folder, transform=rounding).logits(ids)
        log(f"verify: torch reference on the artifact's rounded weights ({time.perf_counter() - t:.0f}s)")
    t = time.perf_counter()
    decoder = OnnxDecoder(out / "model.onnx", threads)
    load_s = time.perf_counter() - t
    got = np.concatenate([decoder.prefill(ids[i : i + 1]) for i in range(prompts)])
    result: dict[str, Any] = {}
    for key, want in expected.items():
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        tag = "" if key == "float" else ".rounded_weights"
        result[f"verify.logit_cosine{tag}.min"] = round(float(cos.min()), 5)
        result[f"verify.logit_cosine{tag}.mean"] = round(float(cos.mean()), 5)
        result[f"verify.top1_agreement{tag}"] = round(float(np.mean(got.argmax(-1) == want.argmax(-1))), 4)
    steps = []
    logits = decoder.prefill(ids[:1], last_only=True)
    for _ in range(decode_tokens):
        token = np.asarray(logits).reshape(1, -1).argmax(-1)
        t = time.perf_counter()
        logits = decoder.step(token)
        steps.append(time.perf_counter() - t)
    result.update(
        {
            "verify.positions": int(ids.size),
            "verify.session_load_s": round(load_s, 1),
            "verify.decode_b1_tok_s": round(1.0 / float(np.median(steps)), 2),
            "verify.peak_rss_mb": round(peak_rss_mb(), 1),
        }
    )
    if perplexity_tokens:
        result.update(_perplexity(decoder, folder, perplexity_tokens, log))
    log("verify: " + ", ".join(f"{k[7:]} {v}" for k, v in result.items()))
    return result


def _perplexity(decoder: Any, folder: Path, tokens: int, log: Log) -> dict[str, Any]:
    """Perplexity of the float model (module by module) and of the artifact on the built-in
    Shakespeare's held-out plays, with decoder-int4's windows (context 512, stride 256), so that the
    figures compare with a ``slimline run`` of that recipe."""
    from transformers import AutoTokenizer

    from slimline.evaluate.llm import onnx_logits, score
    from slimline.measure.data import load_shakespeare
    from slimline.measure.inputs import token_stream
    from slimline.models.sequential import SequentialModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - no tokenizer files, or ones transformers cannot read
        log("verify: no tokenizer in the model folder; perplexity skipped")
        return {}
    ids = token_stream(tokenizer, load_shakespeare(2048, 2000).evaluation, tokens)
    t = time.perf_counter()
    base, base_pred = score(SequentialModel(folder).logits, ids, 512, 256)
    log(f"verify: float perplexity {base:.3f} ({time.perf_counter() - t:.0f}s)")
    ppl, pred = score(onnx_logits(decoder), ids, 512, 256)
    return {
        "verify.perplexity.float": round(base, 4),
        "verify.perplexity": round(ppl, 4),
        "verify.perplexity.change_pct": round(100 * (ppl / base - 1), 2),
        "verify.next_token_agreement": round(float(np.mean(pred == base_pred)), 4),
        "verify.perplexity_tokens": int(len(ids)),
    }
