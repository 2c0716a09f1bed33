"""Decoder LLMs (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, GPT-2) to one ONNX graph that serves prefill and decode.

The graph takes ``input_ids``, ``attention_mask`` (past + new tokens), ``position_ids`` and, per layer,
``past_key_values.{i}.key`` / ``.value`` (``[batch, kv_heads, past, head_dim]``, past may be 0), and
returns ``logits`` and ``present.{i}.key`` / ``.value``. Batch, sequence and past lengths are dynamic.
An optional ``logits_to_keep`` input (int64 ``[1]``, default 0: every position) keeps only the last
k positions' logits, as transformers' argument of that name does: a prefill that only needs the next
token skips the LM head for the rest of the prompt (SmolLM2: 128 x 49152 logits, 25 MB, and a fifth
of the prefill's multiply-adds).

The exporter is ``torch.onnx.export(dynamo=True)``: its graph is the one onnxscript's ONNX Runtime
fusions (RMSNorm, rotary embedding, GroupQueryAttention) are written for. optimum-onnx's TorchScript
export of the same model fused nothing with those rules and decoded at 49 tokens/s against 78 for the
fused dynamo graph (SmolLM2-135M, fp32, 2 threads). The parity check runs a prefill and 5 greedy
decode steps against transformers with its KV cache.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from slimline.errors import StageError
from slimline.family import KNOWN_DECODERS
from slimline.measure.inputs import LOGITS_TO_KEEP, kv_shape

DECODER_TYPES = KNOWN_DECODERS  # the decoder types whose export, fusion and int4 path the tests cover


class _WithCache:
    """Builds the torch wrapper lazily (torch is imported only when exporting)."""

    @staticmethod
    def module(model: Any) -> Any:
        import torch
        from transformers.cache_utils import DynamicCache

        layers, _, _ = kv_shape(model.config)

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, *past):  # noqa: ANN001
                cache = DynamicCache()
                for i in range(layers):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                )
                flat = []
                for i in range(layers):
                    layer = out.past_key_values.layers[i]
                    flat += [layer.keys, layer.values]
                return (out.logits, *flat)

        return Wrapper().eval()


def length_dependent_rope(model: Any) -> tuple[Any, int] | None:
    """The rotary module that switches frequencies by sequence length (Phi-3's LongRoPE, "dynamic" NTK
    scaling), and the pre-training length up to which its original frequencies hold; None if static."""
    for module in model.modules():
        kind = getattr(module, "rope_type", None)
        if isinstance(kind, str) and (kind == "longrope" or "dynamic" in kind) and hasattr(module, "original_inv_freq"):
            limit = getattr(model.config, "original_max_position_embeddings", None) or getattr(module, "original_max_seq_len", 0)
            return module, int(limit)
    return None


@contextlib.contextmanager
def fixed_rope(model: Any) -> Any:
    """Export a length-dependent rotary embedding with its original (short) frequencies: the switch is a
    branch on data, which torch.export can't capture. Exact up to the pre-training length; the torch
    model is left as it was afterwards."""
    found = length_dependent_rope(model)
    if found is None:
        yield
        return
    module, _ = found
    kind, inv_freq = module.rope_type, module.inv_freq
    module.register_buffer("inv_freq", module.original_inv_freq, persistent=False)
    module.rope_type = "default"  # transformers updates the frequencies for "longrope"/"dynamic" only
    try:
        yield
    finally:
        module.rope_type = kind
        module.register_buffer("inv_freq", inv_freq, persistent=False)


def export_decoder(model: Any, path: Any, opset: int) -> None:
    program = export_program(model, opset, optimize=True)
    program.save(str(path), external_data=_large(model))
    import onnx

    graph = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    if add_logits_to_keep(graph):
        onnx.save_model(graph, str(path))


def export_program(model: Any, opset: int, optimize: bool = True, fake_mode: Any = None) -> Any:
    """The ``torch.onnx`` program of ``model`` with its KV cache. Under ``fake_mode`` (a torch
    FakeTensorMode that built ``model``) the weights are never allocated: the streaming path traces an
    8B model's graph this way and binds the real weights afterwards (``slimline.streaming``)."""
    import torch

    if model.config.model_type not in DECODER_TYPES:
        raise StageError(
            f"compile.export: text-generation export supports model types {', '.join(DECODER_TYPES)}; "
            f"this model is `{model.config.model_type}`."
        )
    layers, kv, hd = kv_shape(model.config)
    batch, seq, past = 2, 5, 3
    with fake_mode or contextlib.nullcontext():
        args = (
            torch.randint(0, min(1000, model.config.vocab_size), (batch, seq)),
            torch.ones(batch, seq + past, dtype=torch.int64),
            torch.arange(past, past + seq).expand(batch, seq),
            *[torch.randn(batch, kv, past, hd) for _ in range(2 * layers)],
        )
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: t},
        "position_ids": {0: b, 1: s},
        "past": tuple({0: b, 2: p} for _ in range(2 * layers)),
    }
    names = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")
    ]
    outputs = ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    with fake_mode or contextlib.nullcontext(), torch.no_grad(), fixed_rope(model):
        return torch.onnx.export(
            _WithCache.module(model),
            args,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=names,
            output_names=outputs,
            opset_version=opset,
            optimize=optimize,
            verbose=False,
        )


def add_logits_to_keep(model: Any) -> bool:
    """Give the LM head a ``logits_to_keep`` input: ``Slice(hidden, -k, end, axis=1)`` before it.

    The input is an overridable initializer holding 0, so a caller that does not feed it (perplexity,
    other tools) gets every position's logits; ONNX Runtime lists it under
    ``get_overridable_initializers()``. Returns False when the ``logits`` output is not made by a
    MatMul (no LM head to slice in front of).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    head = next((n for n in graph.node if "logits" in n.output), None)
    if (
        head is None
        or head.op_type not in ("MatMul", "MatMulNBits", "MatMulQ4", "MatMulQ8")
        or any(i.name == LOGITS_TO_KEEP for i in graph.input)
    ):
        return False
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), LOGITS_TO_KEEP),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{LOGITS_TO_KEEP}_end"),
            numpy_helper.from_array(np.array([1], np.int64), f"{LOGITS_TO_KEEP}_axis"),
        ]
    )
    kept = f"{head.input[0]}_kept"
    at = list(graph.node).index(head)
    graph.node.insert(
        at,
        helper.make_node(
            "Slice",
            [head.input[0], f"{LOGITS_TO_KEEP}_start", f"{LOGITS_TO_KEEP}_end", f"{LOGITS_TO_KEEP}_axis"],
            [kept],
            name=f"{LOGITS_TO_KEEP}_slice",
        ),
    )
    graph.node.insert(at, helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{LOGITS_TO_KEEP}_start"], name=f"{LOGITS_TO_KEEP}_neg"))
    head.input[0] = kept
    return True


def _large(model: Any) -> bool:
    return sum(p.numel() for p in model.parameters()) * 4 > 1_800_000_000


def torch_stepper(model: Any) -> Any:
    """Last-token logits from transformers, recomputing the whole sequence (the plain reference)."""
    import torch

    state: dict[str, np.ndarray] = {}

    def fn(tokens: np.ndarray, reset: bool = False) -> np.ndarray:
        state["ids"] = tokens if reset else np.concatenate([state["ids"], tokens], axis=1)
        with torch.no_grad():
            return model(torch.from_numpy(state["ids"])).logits[0, -1].numpy()

    return fn


def onnx_stepper(path: Any, threads: int = 0) -> Any:
    """Last-token logits from an exported decoder graph, with its KV cache."""
    from slimline.generate import OnnxDecoder

    decoder = OnnxDecoder(path, threads)

    def fn(tokens: np.ndarray, reset: bool = False) -> np.ndarray:
        return decoder.prefill(tokens)[0, -1] if reset else decoder.step(tokens[0])[0]

    return fn
