"""Reproduce the default recipe's figures, several times, and show how stable the ratios are.

    .venv/bin/python benchmarks/minilm_int8.py --runs 3

Each run is a full `slimline run recipes/minilm-int8.yaml` (export, fuse, int8, evaluation with the
torch fp32 baseline interleaved). Prints one line per run and the median/min/max of each figure.
Absolute latencies drift with the machine; the speedup is a ratio measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from slimline import api
from slimline.measure.timer import cpu_busy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--recipe", default="minilm-int8")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    _, recipe = api.load_recipe(a.recipe, a.overrides)
    print(f"recipe {recipe.name}; other processes keep {cpu_busy():.0%} of the CPUs busy before the first run")
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            report = api.run(recipe, Path(tmp) / f"run{i}").report
            rows = {(r["variant"], r["mode"], r["batch_size"]): r for r in report["results"]}
            s = report["summary"]["ort-cpu"]
            line = {
                "speedup_b1": rows[("compressed", "fixed", 1)]["speedup"],
                "speedup_b32": rows[("compressed", "fixed", 32)]["speedup"],
                "speedup_traffic": s["traffic_speedup"],
                "torch_b32_seq_s": rows[("baseline", "fixed", 32)]["throughput_per_s"],
                "int8_b32_seq_s": rows[("compressed", "fixed", 32)]["throughput_per_s"],
                "mean_cosine": s["mean_cosine"],
                "top10": s["top10_overlap"],
                "rss_torch_mb": rows[("baseline", "fixed", 1)]["peak_rss_mb"],
                "rss_int8_mb": s["peak_rss_mb"],
                "size_mb": s["size_mb"],
                "cpu_busy": report["measurement"]["cpu_busy_by_others_before"],
            }
            print(f"run {i}: " + ", ".join(f"{k} {v}" for k, v in line.items()), flush=True)
            for k, v in line.items():
                if v is not None:
                    figures.setdefault(k, []).append(v)
    print("\n| figure | median | min | max |\n|---|---|---|---|")
    for k, v in figures.items():
        print(f"| {k} | {statistics.median(v):.4g} | {min(v):.4g} | {max(v):.4g} |")


if __name__ == "__main__":
    main()
