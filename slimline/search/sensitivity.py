"""``slimline sensitivity RECIPE``: which layer is killing the accuracy, measured one layer at a time.

The recipe's stages up to its first quantizer (export, fusion, pruning, and SmoothQuant, which is
exact in float) give the float graph. Then,
for every layer with a constant weight and every candidate format, a copy of that graph where only
that layer changes is built and run on the evaluation texts:

- ``int8``: ONNX Runtime's ``quantize_dynamic`` on that node alone (per-channel weights, int8
  activations: MatMulInteger, or QAttention for a fused Attention);
- ``int8-static``: ``quantize.static_int8`` (ONNX Runtime's ``quantize_static``, QDQ, per-channel
  weights, MinMax activation ranges calibrated on the recipe's calibration texts) on that node alone;
- ``int4-32`` / ``int4-64`` / ``int4-128``: RTN weights in MatMulNBits with blocks of that size
  (``accuracy_level`` 4, as ``quantize.weight_only`` builds them);
- ``fp16``: the weight rounded to fp16 and back (what fp16 storage does to it; the compute stays fp32).

Each point reports the output error (relative to the float graph's outputs) and the task metric
(mean cosine to torch fp32 for an encoder's vectors), the layer named by node and by role
(``ffn.out@0``).

A decoder (text-generation) is measured on what its recipe's ``quantize.weight_only`` would build:
formats ``int4-N`` and ``int8-N`` are that stage's own quantizer (its algorithm, GPTQ with its
calibration Hessians, clip search, symmetric or not, and its kernel: with ``kernel: slimline`` the
float minimums of MatMulQ4 / MatMulQ8 and their bytes) at those bits and blocks. The float graph is
run once with every candidate weight made an overridable initializer, so each point is one run with
that layer's dequantized weight fed in, on windows of calibration text (never the held-out plays the
run's perplexity is scored on). Each point reports the mean KL divergence of the next-token
distribution from the float graph's (nats per token; small changes add up across layers, which is
what ``slimline mixed`` sums), the perplexity change on those windows, the layer's own output error
(what the quantizer's report and ``fallback: auto`` go by), and the format's stored bytes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimline.api import load_recipe
from slimline.errors import OutputError, RecipeError

FORMATS = ("int8", "int8-static", "int4-32", "int4-64", "int4-128", "fp16")
DECODER_FORMATS = ("int4-32", "int4-64", "int4-128", "int8-64")
DECODER_WINDOW = 128  # tokens per calibration window a decoder is scored on
Log = Callable[[str], None]


def _variant(model: Any, node: Any, fmt: str, src: Path, dst: Path, static: tuple[Any, list[dict]] | None = None) -> bool:
    """Write ``model`` with only ``node`` in ``fmt`` to ``dst``; False when the format doesn't apply.
    ``static``: the ``quantize.static_int8`` stage for ``int8-static`` (the recipe's, or the defaults)
    and the feeds that set its activation ranges."""
    import copy

    import onnx
    from onnx import numpy_helper

    from slimline.quantize import nbits
    from slimline.quantize.common import weight_of
    from slimline.quantize.weight_only import replace_matmuls

    if fmt == "int8-static":
        if node.op_type != "MatMul" or weight_of(model, node) is None or static is None:
            return False  # QDQ has no form for a fused Attention
        stage, feeds = static
        others = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name != node.name}
        stage.quantize_file(src, dst, feeds, others)
        changed = onnx.load(str(dst), load_external_data=False)
        return any(n.op_type == "DequantizeLinear" for n in changed.graph.node)

    if fmt == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from slimline.runtime import quiet

        with quiet():
            quantize_dynamic(
                str(src),
                str(dst),
                per_channel=True,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=[node.name],
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        changed = onnx.load(str(dst), load_external_data=False)
        return any(n.name.startswith(node.name) and n.op_type != node.op_type for n in changed.graph.node)
    if node.op_type != "MatMul":
        return False  # a fused Attention's weight has no int4 or fp16 kernel of its own here
    w = weight_of(model, node)
    if w is None:
        return False
    m = copy.deepcopy(model)
    if fmt == "fp16":
        for t in m.graph.initializer:
            if t.name == node.input[1]:
                t.CopyFrom(numpy_helper.from_array(w.astype(np.float16).astype(np.float32), t.name))
    else:
        block = int(fmt.split("-")[1])
        if w.shape[0] < block:
            return False
        m = replace_matmuls(m, {node.name: nbits.rtn(w, 4, block)}, accuracy_level=4)
    onnx.save_model(m, str(dst))
    return True


def weight_format(fmt: str) -> tuple[int, int] | None:
    """``int4-32`` -> (4, 32): a weight-only format's bits and block size; None for any other name."""
    kind, _, block = fmt.partition("-")
    if kind in ("int4", "int8") and block.isdigit() and int(block) >= 16 and int(block) & (int(block) - 1) == 0:
        return int(kind[3:]), int(block)
    return None


def decoder_points(
    src: Path,
    stage: Any,
    artifact: Any,
    ctx: Any,
    texts: list[str],
    formats: tuple[str, ...],
    threads: int,
    work: Path,
    log: Log,
) -> tuple[float, list[dict]]:
    """Every weight-only layer of the float decoder graph at ``src`` in every format, alone; returns the
    float graph's perplexity on the windows and one row per (layer, format)."""
    import onnx
    from onnx import helper

    from slimline.evaluate.llm import log_softmax
    from slimline.family import role_of
    from slimline.measure.inputs import calibration_feeds
    from slimline.measure.metrics import relative_error
    from slimline.quantize import nbits
    from slimline.quantize.common import module_path
    from slimline.quantize.weight_only import q4_kernel
    from slimline.runtime import ort_session

    model = onnx.load(str(src))
    layers = stage.candidates(model, ctx)[0]  # what the stage itself would quantize
    nodes = {n.name: n for n in model.graph.node if n.name in layers}
    captured = stage._capture(model, artifact, layers, ctx)  # the stage's own calibration: samples, and Hessians for GPTQ
    log(f"sensitivity: calibration captured for {len(layers)} layers ({stage.algorithm})")
    # each layer's weight becomes an overridable initializer (a graph input with a default); a tied LM head
    # gets its own copy first, so feeding it leaves the embedding Gather alone
    fed: dict[str, str] = {}
    inits = {t.name: t for t in model.graph.initializer}
    for name, node in nodes.items():
        weight = node.input[1]
        if node.op_type == "FusedMatMul" or sum(weight in n.input for n in model.graph.node) > 1:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[weight])
            copy.name = f"{weight}_sensitivity_{len(fed)}"
            model.graph.initializer.append(copy)
            node.input[1] = weight = copy.name
        fed[name] = weight
        model.graph.input.append(helper.make_tensor_value_info(weight, onnx.TensorProto.FLOAT, None))
    path = work / "overridable.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="overridable.onnx.data")
    transposed = {name for name, node in nodes.items() if node.op_type == "FusedMatMul"}
    del model, inits
    session = ort_session(path, threads)
    inputs = [i.name for i in session.get_inputs() if i.name not in set(fed.values())]
    feeds = calibration_feeds(artifact.tokenizer, texts, inputs, batch=4, max_length=DECODER_WINDOW, config=artifact.config)
    feeds = [{k: v for k, v in f.items() if k in inputs} for f in feeds]

    def log_probs(extra: dict) -> list[np.ndarray]:
        out = []
        for f in feeds:
            out.append(log_softmax(session.run(["logits"], {**f, **extra})[0][:, :-1]).astype(np.float32))
        return out

    targets = [f["input_ids"][:, 1:] for f in feeds]

    def nll(logp: list[np.ndarray]) -> float:
        picked = [np.take_along_axis(lp, t[..., None], -1) for lp, t in zip(logp, targets, strict=True)]
        return float(-np.mean(np.concatenate([p.ravel() for p in picked])))

    ref = log_probs({})
    ref_p = [np.exp(lp) for lp in ref]
    base_nll = nll(ref)
    tokens = sum(t.size for t in targets)
    log(
        f"sensitivity: {len(layers)} layers x {len(formats)} formats, each scored on {tokens} tokens "
        f"({len(feeds)} batches of windows of {DECODER_WINDOW}); float graph perplexity {np.exp(base_nll):.4f}"
    )
    rows = []
    t0 = time.perf_counter()
    for i, (name, (act, w)) in enumerate(layers.items()):
        c = captured[act] if captured else None
        path_ = module_path(nodes[name])
        role = "lm_head" if name in transposed or "logits" in nodes[name].output else role_of(path_)
        for fmt in formats:
            bits, block = weight_format(fmt)
            if w.shape[0] < block:
                continue
            b = stage.quantize_weight(w, c.gram if c is not None else None, bits, block)
            wq = b.dequantize()
            lp = log_probs({fed[name]: np.ascontiguousarray(wq.T if name in transposed else wq)})
            kl = float(np.mean(np.concatenate([(p * (r - q)).sum(-1).ravel() for p, r, q in zip(ref_p, ref, lp, strict=True)])))
            rows.append(
                {
                    "node": name,
                    "op": nodes[name].op_type,
                    "role": role,
                    "module": path_,
                    "format": fmt,
                    "kl": round(max(kl, 0.0), 8),
                    "perplexity_change": round(float(np.exp(nll(lp) - base_nll) - 1.0), 6),
                    "output_error": round(relative_error(c.sample @ w, c.sample @ wq), 6) if c is not None else None,
                    # the bytes the stage would write, in its kernel's layout
                    "weight_bytes": int(
                        sum(v.nbytes for v in nbits.pack_for(b, stage.kernel == "slimline" and q4_kernel(b)).values())
                    ),
                }
            )
        log(f"sensitivity: layer {i + 1}/{len(layers)} {name} ({role or '-'}) in {time.perf_counter() - t0:.0f}s")
    return float(np.exp(base_nll)), rows


def sensitivity(
    recipe_ref: str | Path,
    out: Path,
    *,
    model: str | None = None,
    task: str | None = None,
    formats: tuple[str, ...] | None = None,
    texts: int | None = None,
    threads: int = 0,
    log: Log = print,
) -> dict[str, Any]:
    import onnx

    from slimline.evaluate import fidelity as fid
    from slimline.evaluate.targets import ort_runner, torch_runner
    from slimline.family import family_of, role_of
    from slimline.measure import metrics
    from slimline.measure.data import load_data
    from slimline.measure.metrics import relative_error
    from slimline.models import load_model
    from slimline.quantize.common import module_path
    from slimline.stage import Context

    _, recipe = load_recipe(recipe_ref, (), model, task)
    decoder = recipe.model.task == "text-generation"
    # the float graph: every stage before the first quantizer (SmoothQuant is exact in float, so it belongs here)
    cut = next(
        (i for i, s in enumerate(recipe.stages) if s.kind.startswith("quantize.") and s.kind != "quantize.smoothquant"), None
    )
    prefix = [s for s in recipe.stages[:cut] if s.kind != "compile.tune"]
    quantizer = recipe.stages[cut] if cut is not None else None
    if decoder:
        formats = formats or DECODER_FORMATS
        texts = texts or 96
        if quantizer is None or quantizer.kind != "quantize.weight_only":
            raise RecipeError(
                f"sensitivity: {recipe.name} is a text-generation recipe whose first quantizer is "
                f"{quantizer.kind if quantizer else 'missing'}; a decoder's sensitivity measures the formats of "
                "quantize.weight_only (int4-N, int8-N). Add that stage to the recipe."
            )
        for f in formats:
            if weight_format(f) is None:
                raise RecipeError(
                    f"sensitivity: format {f} is not a weight-only format; a decoder takes int4-N or int8-N "
                    f"(N the block size, e.g. {', '.join(DECODER_FORMATS)})."
                )
    else:
        formats = formats or FORMATS
        texts = texts or 256
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise RecipeError(f"sensitivity: unknown format {bad[0]}; choose from {', '.join(FORMATS)}.")
    if out.exists():
        raise OutputError(f"--out {out}: exists; slimline writes sensitivity results only into a new folder. Choose another.")
    work = Path(tempfile.mkdtemp(prefix="slimline-sensitivity-"))
    try:
        data = load_data(recipe.evaluate.data)
        ref = load_model(
            recipe.model.source, recipe.model.task, recipe.model.pooling, recipe.model.revision, recipe.model.trust_remote_code
        )
        ctx = Context(workdir=work / "stages", threads=threads, load_data=lambda: data, reference=ref)
        artifact = ref
        for stage in prefix:
            artifact = stage.run(artifact, ctx).artifact
            log(f"sensitivity: {stage.kind} done")
        src = Path(artifact.path)
        if decoder:
            base, rows = decoder_points(src, quantizer, artifact, ctx, data.calibration[:texts], formats, threads, work, log)
            return write(out, recipe.name, base, formats, rows, log, metric="kl")
        graph = onnx.load(str(src))
        sample = data.evaluation[:texts]
        family = family_of(recipe.model.task)
        pooling, length = ref.info.pooling, recipe.evaluate.data.max_length
        truth = fid.encode(torch_runner(ref.model, "torch fp32", threads), ref.tokenizer, sample, family, pooling, length)
        float_out = fid.encode(ort_runner(src, "float", threads), ref.tokenizer, sample, family, pooling, length)
        kind = family.vectors
        base = metrics.fidelity(truth, float_out, kind)["mean_cosine"]
        layers = [
            n
            for n in graph.graph.node
            if n.name
            and n.op_type in ("MatMul", "Attention")
            and len(n.input) > 1
            and any(t.name == n.input[1] for t in graph.graph.initializer)
        ]
        log(
            f"sensitivity: {len(layers)} layers x {len(formats)} formats on {len(sample)} texts; float graph mean cosine {base:.5f}"
        )
        sizes = {t.name: int(np.prod(t.dims)) * 4 for t in graph.graph.initializer}  # fp32 bytes of each weight
        static = None
        if "int8-static" in formats:
            from slimline.quantize.static import StaticInt8

            stage = quantizer if quantizer is not None and quantizer.kind == "quantize.static_int8" else StaticInt8()
            static = (stage, stage.prepare(graph, artifact, ctx))
        rows = []
        t0 = time.perf_counter()
        attention = 0
        for i, node in enumerate(layers):
            path = module_path(node)
            role = role_of(path)
            if node.op_type == "Attention":  # fused: Q/K/V in one weight, numbered in graph order
                role, attention = f"attention.fused@{attention}", attention + 1
            for fmt in formats:
                dst = work / f"v{i}-{fmt}.onnx"
                if not _variant(graph, node, fmt, src, dst, static):
                    continue
                vecs = fid.encode(ort_runner(dst, fmt, threads), ref.tokenizer, sample, family, pooling, length)
                cos = metrics.fidelity(truth, vecs, kind)["mean_cosine"]
                rows.append(
                    {
                        "node": node.name,
                        "op": node.op_type,
                        "role": role,
                        "module": path,
                        "format": fmt,
                        "output_error": round(relative_error(np.nan_to_num(float_out), np.nan_to_num(vecs)), 6),
                        "mean_cosine": round(float(cos), 6),
                        "cosine_drop": round(float(base - cos), 6),
                        "weight_bytes": sizes.get(node.input[1], 0),
                    }
                )
                for f in work.glob(f"v{i}-{fmt}.onnx*"):
                    f.unlink()
            log(
                f"sensitivity: layer {i + 1}/{len(layers)} {node.name} ({role_of(path) or node.op_type}) in {time.perf_counter() - t0:.0f}s"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write(out, recipe.name, base, formats, rows, log)


def write(
    out: Path, name: str, base: float, formats: tuple[str, ...], rows: list[dict], log: Log, metric: str = "cosine_drop"
) -> dict[str, Any]:
    """The report files; ``metric``: what a cell shows and the ranking goes by (``cosine_drop`` for an
    encoder, ``kl`` for a decoder)."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    by_node: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = by_node.setdefault(r["node"], {"node": r["node"], "role": r["role"], "op": r["op"], "drops": {}, "errors": {}})
        entry["drops"][r["format"]] = r[metric]
        entry["errors"][r["format"]] = r["output_error"] if r["output_error"] is not None else float("nan")
        if "perplexity_change" in r:
            entry.setdefault("perplexity", {})[r["format"]] = r["perplexity_change"]
    ranked = sorted(by_node.values(), key=lambda e: (-max(e["drops"].values()), -max(e["errors"].values())))
    result = {
        "recipe": name,
        "metric": metric,
        ("float_perplexity" if metric == "kl" else "float_mean_cosine"): base,
        "formats": list(formats),
        "rows": rows,
        "ranked": [e["node"] for e in ranked],
    }
    (staging / "sensitivity.json").write_text(json.dumps(result, indent=2))
    if metric == "kl":
        about = (
            f"Float graph perplexity on the scored calibration windows: {base:.4f}. Each cell: the mean KL divergence "
            "(nats per token, x1e-3) of the next-token distribution from the float graph's when that layer alone takes "
            "that format; in brackets the perplexity change on the same windows and the layer's own output error "
            "(what the quantizer's report goes by); worst first. '-': the format doesn't apply (K under the block)."
        )

        def cell(e: dict, f: str) -> str:
            return f"{e['drops'][f] * 1e3:.3f} ({e['perplexity'][f]:+.2%}, {e['errors'][f]:.4f})"
    else:
        about = (
            f"Mean cosine to torch fp32 of the float graph: {base:.5f}. Each cell: the drop in mean cosine when that "
            "layer alone takes that format (output error relative to the float graph in brackets); worst first. "
            "'-': the format has no kernel for that op here."
        )

        def cell(e: dict, f: str) -> str:
            return f"{e['drops'][f]:+.5f} ({e['errors'][f]:.4f})"

    lines = [
        f"# Per-layer sensitivity: {name}",
        "",
        about,
        "",
        "| rank | layer (role) | op | " + " | ".join(formats) + " |",
        "|---|---|---|" + "---|" * len(formats),
    ]
    for i, e in enumerate(ranked, 1):
        cells = [cell(e, f) if f in e["drops"] else "-" for f in formats]
        lines.append(f"| {i} | {e['node']} ({e['role'] or '-'}) | {e['op']} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (staging / "sensitivity.md").write_text(md)
    label = (
        "mean next-token KL from the float graph when this layer alone changes (nats/token)"
        if metric == "kl"
        else "drop in mean cosine to fp32 when this layer alone changes"
    )
    _plot(ranked, formats, staging / "sensitivity.png", name, label)
    import base64
    import html

    png = base64.b64encode((staging / "sensitivity.png").read_bytes()).decode()
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>" for line in lines[6:]
    )
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in lines[4].strip("|").split("|"))
    (staging / "sensitivity.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>sensitivity {html.escape(name)}</title>"
        f"<h1>Per-layer sensitivity: {html.escape(name)}</h1><p>{html.escape(lines[2])}</p>"
        f"<img src='data:image/png;base64,{png}'><table border=1 cellpadding=3><tr>{head}</tr>{table}</table>"
    )
    staging.rename(out)
    log(f"sensitivity: written {out}/sensitivity.md, .json, .png, .html; worst: {ranked[0]['node'] if ranked else '-'}")
    return result


def _plot(ranked: list[dict], formats: tuple[str, ...], path: Path, name: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = ranked[:20]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(top) + 1.5), dpi=110)
    height = 0.8 / max(len(formats), 1)
    for j, fmt in enumerate(formats):
        ys = [i + j * height for i in range(len(top))]
        ax.barh(ys, [e["drops"].get(fmt, 0.0) for e in top], height=height, label=fmt)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(top))])
    ax.set_yticklabels([f"{e['role'] or e['node']}" for e in top], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.set_title(f"{name}: the {len(top)} most sensitive layers", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
