"""A recipe found by `slimline search` against a hand-tuned recipe, timed side by side.

    .venv/bin/python benchmarks/search_vs_recipe.py runs/search-encoder [--recipe minilm-int8] [--also 31] [--repeats 10]

Takes the best trial's artifact from a finished study (``best.yaml`` names its run folder), builds the
hand-tuned recipe's stages in this process, and times both with torch fp32, interleaved (ABBA), batch
32 and batch 1 at 128 tokens (ORT CPU EP, 2 threads, spinning off), then measures each one's fidelity
against torch fp32 on the 2,000 held-out Shakespeare lines. Speed figures from separate runs are not
compared: this machine's speed drifts ~1.5x within an hour, so both artifacts are timed in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from slimline import api
from slimline.evaluate import fidelity as fid
from slimline.evaluate.speed import time_runners
from slimline.evaluate.targets import ort_runner, torch_runner
from slimline.family import family_of
from slimline.measure import metrics
from slimline.measure.data import load_shakespeare
from slimline.measure.inputs import fixed_batch
from slimline.measure.timer import cpu_busy, median
from slimline.models import load_model


def best_trial(study: Path) -> tuple[Path, str]:
    text = (study / "best.yaml").read_text()
    folder = next(line.strip("# \n") for line in text.splitlines() if line.startswith("#   trials/"))
    choices = [line[4:] for line in text.splitlines() if line.startswith("#   ") and "=" in line]
    return study / folder / "model.onnx", ", ".join(choices)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("study", type=Path)
    p.add_argument("--recipe", default="minilm-int8")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--also", type=int, action="append", default=[], help="another trial of the study to time beside them")
    a = p.parse_args()
    found, choices = best_trial(a.study)
    recipe = yaml.safe_load((a.study / "best.yaml").read_text())
    print(f"search's best: {found.parent} ({choices})")
    work = Path(tempfile.mkdtemp(prefix="search-bench-"))
    t0 = time.perf_counter()
    hand = api.run(a.recipe, out=work / a.recipe, evaluate=False).folder / "model.onnx"
    print(f"built {a.recipe} in {time.perf_counter() - t0:.0f}s", flush=True)
    ref = load_model(recipe["model"]["source"])
    data = load_shakespeare(256, 2000)
    print(f"before timing, other processes keep {cpu_busy():.0%} of the CPUs busy", flush=True)
    base = torch_runner(ref.model, "torch fp32", 2)
    runners = [base, ort_runner(hand, f"slimline {a.recipe}", 2), ort_runner(found, "slimline search best", 2)]
    runners += [ort_runner(a.study / "trials" / f"{n:04d}" / "model.onnx", f"search trial {n}", 2) for n in a.also]
    speed: dict[int, dict[str, float]] = {}
    for batch, reps in ((32, a.repeats), (1, a.repeats * 3)):
        times = time_runners(runners, fixed_batch(ref.tokenizer, data.evaluation, batch, 128), warmup=1, repeats=reps)
        speed[batch] = {n: batch / median(v) for n, v in times.items()}
    busy = cpu_busy()
    encoder = family_of("feature-extraction")
    ref_vecs = fid.encode(base, ref.tokenizer, data.evaluation, encoder, "mean", 128)
    print(f"\nafter timing, other processes keep {busy:.0%} of the CPUs busy\n")
    print("| variant | b32 seq/s | b32 vs torch | b1 seq/s | b1 vs torch | mean cos | min cos | top-10 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runners:
        if r is base:
            f = {"mean_cosine": 1.0, "min_cosine": 1.0, "top10_overlap": 1.0}
        else:
            f = metrics.fidelity(ref_vecs, fid.encode(r, ref.tokenizer, data.evaluation, encoder, "mean", 128), "embeddings")
        b32, b1 = speed[32][r.name], speed[1][r.name]
        print(
            f"| {r.name} | {b32:.1f} | {b32 / speed[32][base.name]:.2f}x | {b1:.1f} | {b1 / speed[1][base.name]:.2f}x | "
            f"{f['mean_cosine']:.4f} | {f['min_cosine']:.4f} | {f['top10_overlap']:.3f} |",
            flush=True,
        )
    s32, s1 = speed[32], speed[1]
    hand_name, found_name = runners[1].name, runners[2].name
    print(
        f"\nsearch best / {a.recipe}: b32 {s32[found_name] / s32[hand_name]:.3f}x, b1 {s1[found_name] / s1[hand_name]:.3f}x "
        "(same run, interleaved)"
    )


if __name__ == "__main__":
    main()
