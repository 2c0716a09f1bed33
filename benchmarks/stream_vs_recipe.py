"""The streaming build against the whole-model recipe on the same small model, decode timed side by side.

    .venv/bin/python benchmarks/stream_vs_recipe.py RECIPE_RUN_DIR STREAM_DIR [--rounds 7] [--steps 32]

Batch-1 greedy decode after a 128-token prompt, in interleaved rounds: one ONNX Runtime session alive at
a time (built, timed, dropped), 2 threads, so neither session's idle threads take the other's cores.
Prints each artifact's median tokens/s, the ratio, their sizes and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def decode_rate(folder: Path, prompt: np.ndarray, steps: int) -> float:
    from slimline.generate import OnnxDecoder

    decoder = OnnxDecoder(folder / "model.onnx", 2)
    logits = decoder.prefill(prompt, last_only=True)
    times = []
    for _ in range(steps):
        token = np.asarray(logits).reshape(1, -1).argmax(-1)
        t = time.perf_counter()
        logits = decoder.step(token)
        times.append(time.perf_counter() - t)
    return 1.0 / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe_run", type=Path)
    parser.add_argument("stream_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores")
    prompt = np.random.default_rng(0).integers(100, 20000, (1, 128))
    rates: dict[str, list[float]] = {"recipe": [], "stream": []}
    for r in range(args.rounds):
        for name, folder in (("recipe", args.recipe_run), ("stream", args.stream_dir)):
            rates[name].append(decode_rate(folder, prompt, args.steps))
        print(f"round {r + 1}: recipe {rates['recipe'][-1]:.1f} tok/s, stream {rates['stream'][-1]:.1f} tok/s", flush=True)
    med = {k: float(np.median(v)) for k, v in rates.items()}
    size = {
        k: sum(p.stat().st_size for p in f.glob("model.onnx*")) / 1e6
        for k, f in (("recipe", args.recipe_run), ("stream", args.stream_dir))
    }
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")
    print("| artifact | decode b1 tok/s (median of rounds) | size MB |\n|---|---|---|")
    for k in rates:
        print(f"| {k} | {med[k]:.1f} | {size[k]:.1f} |")
    print(f"stream / recipe decode: {med['stream'] / med['recipe']:.3f}x")


if __name__ == "__main__":
    main()
