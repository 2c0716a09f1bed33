"""Which GroupQueryAttention form does an execution provider compute right? A GPU diagnostic.

slimline's fused SmolLM2 graphs decode correctly on ONNX Runtime's CPU EP and computed wrong logits
on the CUDA EP of an H200 (docs/llm.md, "CUDA"). This script takes the attention op alone, at
SmolLM2's shapes (9 query heads on 3 key/value heads, head size 64, fp16), in every form the fused
graph can give it, and compares each provider with a numpy reference:

- the QKV input packed into one tensor (what the sibling-MatMul merge produces) or three;
- rotary inside the op (``do_rotary`` with cos/sin caches) or none;
- a prompt with an empty past, a prompt into a past/present buffer bound as both input and output
  (how slimline's CUDA loop runs a prompt), and a decode step on that buffer.

``--artifact RUN_DIR`` then bisects a whole model: every node output of the graph becomes a graph
output, one prompt runs on the CPU EP and on the CUDA EP, and the first nodes (in graph order) whose
outputs disagree are listed.

    python benchmarks/gqa_probe.py [--providers CPU,CUDA] [--artifact runs/smollm2-fp16-cuda] [--out F.json]

On a machine without CUDA only the CPU rows run (a test checks they match the reference, so a CUDA
mismatch is CUDA's). About 20 seconds on a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

HEADS, KV_HEADS, HEAD = 9, 3, 64  # SmolLM2-135M
PROMPT, CAPACITY, MAX_POS = 12, 32, 64
PROVIDERS = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider"}


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rotary embedding, halves not interleaved: x [B, S, N, H], positions [S]."""
    c, s = cos[positions][None, :, None, :], sin[positions][None, :, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def reference(q, k, v, past_k, past_v, past_len: int, cos=None, sin=None):
    """Causal grouped-query attention in float64: q [B, S, N*H], k/v [B, S, Nk*H], past [B, Nk, >=P, H]
    (its first ``past_len`` positions hold the past). Returns (output [B, S, N*H], present k, v [B, Nk, P+S, H])."""
    b, s, _ = q.shape
    q = q.astype(np.float64).reshape(b, s, HEADS, HEAD)
    k = k.astype(np.float64).reshape(b, s, KV_HEADS, HEAD)
    v = v.astype(np.float64).reshape(b, s, KV_HEADS, HEAD)
    positions = np.arange(past_len, past_len + s)
    if cos is not None:
        q, k = rotate(q, cos, sin, positions), rotate(k, cos, sin, positions)
    keys = np.concatenate([past_k[:, :, :past_len].astype(np.float64), k.transpose(0, 2, 1, 3)], 2)
    values = np.concatenate([past_v[:, :, :past_len].astype(np.float64), v.transpose(0, 2, 1, 3)], 2)
    rep = HEADS // KV_HEADS
    kk, vv = np.repeat(keys, rep, 1), np.repeat(values, rep, 1)  # head h reads key/value head h // rep
    scores = np.einsum("bsnh,bnth->bnst", q, kk) / np.sqrt(HEAD)
    total = past_len + s
    causal = np.arange(total)[None, :] <= positions[:, None]
    scores = np.where(causal[None, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bnst,bnth->bsnh", weights, vv).reshape(b, s, HEADS * HEAD)
    return out, keys, values


def gqa_model(packed: bool, rotary: bool, dtype=np.float16):
    """A one-node GroupQueryAttention graph; inputs named after the op's own."""
    from onnx import TensorProto, helper

    t = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    qkv_width = (HEADS + 2 * KV_HEADS) * HEAD if packed else HEADS * HEAD
    inputs = [helper.make_tensor_value_info("query", t, ["B", "S", qkv_width])]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, t, ["B", "S", KV_HEADS * HEAD]) for n in ("key", "value")]
    inputs += [helper.make_tensor_value_info(n, t, ["B", KV_HEADS, "P", HEAD]) for n in ("past_key", "past_value")]
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [1]),
    ]
    if rotary:
        inputs += [helper.make_tensor_value_info(n, t, [MAX_POS, HEAD // 2]) for n in ("cos_cache", "sin_cache")]
    names = ["query", "" if packed else "key", "" if packed else "value", "past_key", "past_value"]
    names += ["seqlens_k", "total_sequence_length"] + (["cos_cache", "sin_cache"] if rotary else [])
    node = helper.make_node(
        "GroupQueryAttention",
        names,
        ["output", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
        do_rotary=int(rotary),
        rotary_interleaved=0,
    )
    outputs = [helper.make_tensor_value_info("output", t, ["B", "S", HEADS * HEAD])]
    outputs += [helper.make_tensor_value_info(n, t, ["B", KV_HEADS, "T", HEAD]) for n in ("present_key", "present_value")]
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    # IR 10, not this onnx's default: an older onnxruntime (the GPU image's 1.31) refuses newer IR versions
    ops = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=ops, ir_version=10)


def _session(model, provider: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=[provider])


def _case_inputs(rng, seq: int, rotary: bool):
    q = rng.standard_normal((1, seq, HEADS * HEAD)).astype(np.float16)
    k = rng.standard_normal((1, seq, KV_HEADS * HEAD)).astype(np.float16)
    v = rng.standard_normal((1, seq, KV_HEADS * HEAD)).astype(np.float16)
    angles = np.arange(MAX_POS)[:, None] * (10000.0 ** (-np.arange(0, HEAD, 2) / HEAD))[None, :]
    cos, sin = (np.cos(angles).astype(np.float16), np.sin(angles).astype(np.float16)) if rotary else (None, None)
    return q, k, v, cos, sin


def _feeds(q, k, v, packed: bool, cos, sin, total: int) -> dict:
    feeds = {"query": np.concatenate([q, k, v], -1) if packed else q}
    if not packed:
        feeds.update({"key": k, "value": v})
    feeds["seqlens_k"] = np.array([total - 1], np.int32)
    feeds["total_sequence_length"] = np.array([total], np.int32)
    if cos is not None:
        feeds.update({"cos_cache": cos, "sin_cache": sin})
    return feeds


def _err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def probe_op(provider: str, seed: int = 0) -> list[dict]:
    """Every form x {prompt with an empty past, prompt into a shared buffer, decode step on it}:
    the relative max error of the output and of the present keys and values (the worse of the two)
    against the reference, or the provider's error."""
    import onnxruntime as ort

    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    rows = []
    for packed, rotary in itertools.product([True, False], [True, False]):
        rng = np.random.default_rng(seed)
        form = {"provider": provider, "packed_qkv": packed, "do_rotary": rotary}
        try:
            sess = _session(gqa_model(packed, rotary), provider)
        except Exception as e:  # noqa: BLE001 - the provider's own error is the finding
            rows.append({**form, "case": "session", "error": str(e).splitlines()[0][:200]})
            continue
        q, k, v, cos, sin = _case_inputs(rng, PROMPT, rotary)
        empty = np.zeros((1, KV_HEADS, 0, HEAD), np.float16)
        want, keys, values = reference(q, k, v, empty, empty, 0, cos, sin)

        # 1. a prompt with an empty past (the CPU loop's prompt)
        try:
            out, pk, pv = sess.run(None, {**_feeds(q, k, v, packed, cos, sin, PROMPT), "past_key": empty, "past_value": empty})
            present = max(_err(pk, keys), _err(pv, values))
            rows.append({**form, "case": "prompt, empty past", "output": _err(out, want), "present": present})
        except Exception as e:  # noqa: BLE001
            rows.append({**form, "case": "prompt, empty past", "error": str(e).splitlines()[0][:200]})

        # 2. the prompt into a buffer bound as past and present (the CUDA loop's prompt), then a step
        buffers = {n: np.zeros((1, KV_HEADS, CAPACITY, HEAD), np.float16) for n in ("past_key", "past_value")}
        cache = {n: ort.OrtValue.ortvalue_from_numpy(b, device, 0) for n, b in buffers.items()}

        try:
            out, pk, pv = _bound_run(sess, cache, device, _feeds(q, k, v, packed, cos, sin, PROMPT))
            present = max(_err(pk[:, :, :PROMPT], keys), _err(pv[:, :, :PROMPT], values))
            rows.append({**form, "case": "prompt, shared buffer", "output": _err(out, want), "present": present})
            q1, k1, v1, _, _ = _case_inputs(rng, 1, rotary)
            want1, keys1, values1 = reference(q1, k1, v1, keys.astype(np.float16), values.astype(np.float16), PROMPT, cos, sin)
            out, pk, pv = _bound_run(sess, cache, device, _feeds(q1, k1, v1, packed, cos, sin, PROMPT + 1))
            rows.append(
                {
                    **form,
                    "case": "decode step, shared buffer",
                    "output": _err(out, want1),
                    "present": max(_err(pk[:, :, : PROMPT + 1], keys1), _err(pv[:, :, : PROMPT + 1], values1)),
                }
            )
        except Exception as e:  # noqa: BLE001
            rows.append({**form, "case": "shared buffer", "error": str(e).splitlines()[0][:200]})
    return rows


def _bound_run(sess, cache: dict, device: str, feeds: dict):
    """One run with ``cache``'s OrtValues bound as both past and present; returns output, key, value."""
    import onnxruntime as ort

    binding = sess.io_binding()
    binding.bind_output("output", "cpu")  # first: get_outputs() lists outputs in binding order
    for name, value in feeds.items():
        if name == "total_sequence_length":
            binding.bind_cpu_input(name, value)
        else:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for name, value in cache.items():
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(name.replace("past", "present"), value)
    sess.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy(), cache["past_key"].numpy(), cache["past_value"].numpy()


def bisect(folder: Path, providers: tuple[str, str] = ("CPU", "CUDA"), tokens: int = 8, top: int = 12) -> list[dict]:
    """Run one prompt through every node of ``folder``'s model.onnx on two providers (every node output
    made a graph output, the KV cache in a buffer bound as past and present) and list the first nodes,
    in graph order, whose outputs disagree."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from slimline.generate import kv_dims

    model = onnx.load(str(folder / "model.onnx"))
    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    typed = {v.name: v for v in model.graph.value_info}
    existing = {o.name for o in model.graph.output}
    order = [o for n in model.graph.node for o in n.output if o and o in typed and o not in existing]
    model.graph.output.extend(typed[o] for o in order)
    path = folder / "bisect.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="bisect.onnx.data")
    ins = {i.name: i for i in model.graph.input}
    past = ins[next(n for n in ins if n.startswith("past_key_values."))].type.tensor_type
    cache_dtype = np.float16 if past.elem_type == onnx.TensorProto.FLOAT16 else np.float32
    kv, head = kv_dims([d.dim_value or d.dim_param for d in past.shape.dim], folder)
    feeds = {
        "input_ids": np.arange(1, tokens + 1, dtype=np.int64)[None] * 7,
        "attention_mask": np.ones((1, tokens), np.int64),
        "position_ids": np.arange(tokens, dtype=np.int64)[None],
    }
    results = []
    for name in providers:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # node outputs as in the file
        sess = ort.InferenceSession(str(path), so, providers=[PROVIDERS[name]])
        binding = sess.io_binding()
        device = "cuda" if name == "CUDA" else "cpu"
        names = [o.name for o in sess.get_outputs() if not o.name.startswith("present")]
        for n in names:  # first: get_outputs() lists outputs in binding order
            binding.bind_output(n, "cpu")
        for n, v in feeds.items():
            binding.bind_cpu_input(n, v)
        for n in ins:
            if n.startswith("past_key_values."):
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv, 2 * tokens, head), cache_dtype), device, 0)
                binding.bind_ortvalue_input(n, buf)
                binding.bind_ortvalue_output(n.replace("past_key_values", "present"), buf)
        sess.run_with_iobinding(binding)
        results.append({n: v.numpy() for n, v in zip(names, binding.get_outputs(), strict=False)})
    path.unlink()
    Path(str(path) + ".data").unlink(missing_ok=True)
    producers = {o: n for n in model.graph.node for o in n.output}
    return disagreements(order, results[0], results[1], producers, top)


def disagreements(order: list[str], a: dict, b: dict, producers: dict, top: int = 12, tol: float = 2e-2) -> list[dict]:
    """The first ``top`` float outputs, in ``order``, whose relative max difference exceeds ``tol``."""
    rows = []
    for o in order:
        x, y = a.get(o), b.get(o)
        if x is None or y is None or x.dtype.kind != "f" or x.shape != y.shape:
            continue
        err = _err(y, x)
        if err > tol:
            rows.append({"output": o, "op": producers[o].op_type, "node": producers[o].name, "rel_max_err": err})
            if len(rows) >= top:
                break
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--providers", default="CPU,CUDA", help="comma list of CPU, CUDA (missing ones are skipped)")
    ap.add_argument("--artifact", type=Path, help="a run folder to bisect node by node, CPU EP vs CUDA EP")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort

    there = set(ort.get_available_providers())
    result: dict = {"onnxruntime": ort.__version__, "op": []}
    for name in args.providers.split(","):
        provider = PROVIDERS[name.strip()]
        if provider not in there:
            result.setdefault("skipped", []).append(provider)
            continue
        result["op"] += probe_op(provider)
    if args.artifact:
        result["bisect"] = bisect(args.artifact) if "CUDAExecutionProvider" in there else "needs the CUDA EP"
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    bad = [r for r in result["op"] if "error" in r or max(r["output"], r["present"]) > 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
