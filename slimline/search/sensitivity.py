"""``slimline sensitivity RECIPE``: which layer is killing the accuracy, measured one layer at a time.

The recipe's stages up to its first quantizer (export, fusion, pruning, and SmoothQuant, which is
exact in float) give the float graph. Then,
for every layer with a constant weight and every candidate format, a copy of that graph where only
that layer changes is built and run on the evaluation texts:

- ``int8``: ONNX Runtime's ``quantize_dynamic`` on that node alone (per-channel weights, int8
  activations: MatMulInteger, or QAttention for a fused Attention);
- ``int4-32`` / ``int4-64`` / ``int4-128``: RTN weights in MatMulNBits with blocks of that size
  (``accuracy_level`` 4, as ``quantize.weight_only`` builds them);
- ``fp16``: the weight rounded to fp16 and back (what fp16 storage does to it; the compute stays fp32).

Each point reports the output error (relative to the float graph's outputs) and the task metric
(mean cosine to torch fp32 for an encoder's vectors), the layer named by node and by role
(``ffn.out@0``). Encoders only for now (feature-extraction, text-classification, token-classification).
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

FORMATS = ("int8", "int4-32", "int4-64", "int4-128", "fp16")
Log = Callable[[str], None]


def _variant(model: Any, node: Any, fmt: str, src: Path, dst: Path) -> bool:
    """Write ``model`` with only ``node`` in ``fmt`` to ``dst``; False when the format doesn't apply."""
    import copy

    import onnx
    from onnx import numpy_helper

    from slimline.quantize import nbits
    from slimline.quantize.common import weight_of
    from slimline.quantize.weight_only import replace_matmuls

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


def sensitivity(
    recipe_ref: str | Path,
    out: Path,
    *,
    model: str | None = None,
    task: str | None = None,
    formats: tuple[str, ...] = FORMATS,
    texts: int = 256,
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
    if recipe.model.task == "text-generation":
        raise RecipeError(
            f"sensitivity: {recipe.name} is a text-generation recipe; per-layer sensitivity covers encoders so far "
            "(feature-extraction, text-classification, token-classification)."
        )
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise RecipeError(f"sensitivity: unknown format {bad[0]}; choose from {', '.join(FORMATS)}.")
    # the float graph: every stage before the first quantizer (SmoothQuant is exact in float, so it belongs here)
    cut = next(
        (i for i, s in enumerate(recipe.stages) if s.kind.startswith("quantize.") and s.kind != "quantize.smoothquant"), None
    )
    prefix = [s for s in recipe.stages[:cut] if s.kind != "compile.tune"]
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
                if not _variant(graph, node, fmt, src, dst):
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


def write(out: Path, name: str, base: float, formats: tuple[str, ...], rows: list[dict], log: Log) -> dict[str, Any]:
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    by_node: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = by_node.setdefault(r["node"], {"node": r["node"], "role": r["role"], "op": r["op"], "drops": {}, "errors": {}})
        entry["drops"][r["format"]] = r["cosine_drop"]
        entry["errors"][r["format"]] = r["output_error"]
    ranked = sorted(by_node.values(), key=lambda e: (-max(e["drops"].values()), -max(e["errors"].values())))
    result = {
        "recipe": name,
        "float_mean_cosine": base,
        "formats": list(formats),
        "rows": rows,
        "ranked": [e["node"] for e in ranked],
    }
    (staging / "sensitivity.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Per-layer sensitivity: {name}",
        "",
        f"Mean cosine to torch fp32 of the float graph: {base:.5f}. Each cell: the drop in mean cosine when that "
        "layer alone takes that format (output error relative to the float graph in brackets); worst first. "
        "'-': the format has no kernel for that op here.",
        "",
        "| rank | layer (role) | op | " + " | ".join(formats) + " |",
        "|---|---|---|" + "---|" * len(formats),
    ]
    for i, e in enumerate(ranked, 1):
        cells = [f"{e['drops'][f]:+.5f} ({e['errors'][f]:.4f})" if f in e["drops"] else "-" for f in formats]
        lines.append(f"| {i} | {e['node']} ({e['role'] or '-'}) | {e['op']} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (staging / "sensitivity.md").write_text(md)
    _plot(ranked, formats, staging / "sensitivity.png", name)
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


def _plot(ranked: list[dict], formats: tuple[str, ...], path: Path, name: str) -> None:
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
    ax.set_xlabel("drop in mean cosine to fp32 when this layer alone changes")
    ax.set_title(f"{name}: the {len(top)} most sensitive layers", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
