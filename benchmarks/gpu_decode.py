"""Batch-1 decode on one GPU, side by side in one process: slimline's ONNX artifacts on the CUDA EP
(plain launches and CUDA graphs), torch fp16 eager, and torch.compile(mode="reduce-overhead").

    python benchmarks/gpu_decode.py --artifact RUN [--artifact RUN2 ...] --hf HF_FOLDER --out decode.json

For each ONNX artifact it also reports, from a torch.profiler trace of one generation (CUPTI sees
ONNX Runtime's kernels too, it traces the whole process): host launch calls per token, GPU kernels
per token, GPU busy time per token against wall time per token (how launch-bound decoding is), and
the kernels that cost most; and which nodes ONNX Runtime placed on the CPU EP. The CUDA-graph
variant's tokens are checked against the plain loop's (greedy: they must be identical).
Speed: greedy, NEW tokens after a PROMPT-token prompt, prefill included, median of ROUNDS interleaved
rounds after warm-up. Needs CUDA torch and onnxruntime-gpu; prints a line per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ort_variant(path: Path, graph: bool):
    from slimline.generate import OnnxDecoder, Sampling

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    d = OnnxDecoder(path / "model.onnx", 0, providers, cuda_graph=graph)

    def run(ids: np.ndarray, new: int) -> np.ndarray:
        return d.generate(ids, Sampling(max_new_tokens=new))

    return run, d


def torch_variants(hf: Path, compile_: bool):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float16).cuda().eval()
    if compile_:
        # generate() compiles the forward itself for a static cache on CUDA (wrapping model.forward by hand
        # breaks on HF's cache updates: "accessing tensor output of CUDAGraphs that has been overwritten")
        from transformers.generation.configuration_utils import CompileConfig

        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")

    def run(ids: np.ndarray, new: int) -> np.ndarray:
        t = torch.from_numpy(ids).cuda()
        with torch.inference_mode():
            out = model.generate(
                t, attention_mask=torch.ones_like(t), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )
        torch.cuda.synchronize()
        return out[:, ids.shape[1] :].cpu().numpy()

    return run


def profile(run, ids: np.ndarray, new: int) -> dict:
    """Launch calls, kernels and GPU busy time per token for one generation, and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run(ids, new)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    launches = {"kernel": 0, "graph": 0, "memcpy": 0}
    kernels, busy_us = {}, 0.0
    for e in prof.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if "memcpy" in name.lower() or "memset" in name.lower():
                continue
            dur = e.device_time if hasattr(e, "device_time") else e.cuda_time
            kernels.setdefault(name, [0, 0.0])
            kernels[name][0] += 1
            kernels[name][1] += dur
            busy_us += dur
        elif name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"):
            launches["kernel"] += 1
        elif name in ("cudaGraphLaunch", "cuGraphLaunch"):
            launches["graph"] += 1
        elif name.startswith(("cudaMemcpy", "cuMemcpy")):
            launches["memcpy"] += 1
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
    n = ids.shape[0] * new
    return {
        "host_kernel_launches_per_token": round(launches["kernel"] / n, 1),
        "graph_launches_per_token": round(launches["graph"] / n, 2),
        "memcpy_calls_per_token": round(launches["memcpy"] / n, 1),
        "gpu_kernels_per_token": round(sum(k[0] for k in kernels.values()) / n, 1),
        "gpu_busy_us_per_token": round(busy_us / n, 1),
        "wall_us_per_token_profiled": round(wall * 1e6 / n, 1),
        "top_kernels": [{"kernel": k[:120], "calls": c, "us_total": round(us, 1)} for k, (c, us) in top],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, action="append", required=True, help="run folder(s) with model.onnx")
    ap.add_argument("--hf", type=Path, help="the float HF folder (torch baselines)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (its warm-up compiles for a minute)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    result: dict = {
        "gpu": torch.cuda.get_device_name(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "prompt": a.prompt,
        "new_tokens": a.new,
        "rounds": a.rounds,
        "variants": {},
        "errors": {},
    }
    ids = np.random.default_rng(0).integers(100, 10000, size=(1, a.prompt)).astype(np.int64)
    if a.hf:  # a real prompt, so that greedy continuations are comparable across engines
        from transformers import AutoTokenizer

        text = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 4
        ids = np.array([AutoTokenizer.from_pretrained(a.hf)(text)["input_ids"][: a.prompt]], np.int64)
    runs: dict = {}
    tokens: dict = {}
    for art in a.artifact:
        for graph in (False, True):
            name = f"ort-cuda{'+graph' if graph else ''} {art.name}"
            try:
                run, d = ort_variant(art, graph)
                tokens[name] = run(ids, a.new)  # warm-up (and a graph's capture)
                run(ids, a.new)
                runs[name] = run
                log(f"{name}: ready")
            except Exception as e:  # noqa: BLE001 - record and go on
                result["errors"][name] = str(e).splitlines()[0][:400]
                log(f"{name}: FAILED {result['errors'][name]}")
        plain, graphed = f"ort-cuda {art.name}", f"ort-cuda+graph {art.name}"
        if plain in tokens and graphed in tokens:
            result.setdefault("graph_tokens_identical", {})[art.name] = bool((tokens[plain] == tokens[graphed]).all())
        try:
            from slimline.evaluate.llm import decode_step_placement

            _, d = ort_variant(art, False)
            result.setdefault("placement", {})[art.name] = decode_step_placement(art / "model.onnx", d, 0)
        except Exception as e:  # noqa: BLE001
            result["errors"][f"placement {art.name}"] = str(e).splitlines()[0][:400]
    if a.hf:
        for compile_ in (False, True) if not a.no_compile else (False,):
            name = "torch-fp16 compile(reduce-overhead)+static cache" if compile_ else "torch-fp16 eager"
            try:
                t0 = time.perf_counter()
                run = torch_variants(a.hf, compile_)
                tokens[name] = run(ids, a.new)
                run(ids, a.new)
                runs[name] = run
                log(f"{name}: ready ({time.perf_counter() - t0:.0f} s with warm-up)")
            except Exception as e:  # noqa: BLE001
                result["errors"][name] = str(e).splitlines()[0][:400]
                log(f"{name}: FAILED {result['errors'][name]}")
    times: dict[str, list[float]] = {n: [] for n in runs}
    names = list(runs)
    for r in range(a.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            runs[name](ids, a.new)
            times[name].append(time.perf_counter() - t0)
        log(f"round {r + 1}/{a.rounds}")
    for name, t in times.items():
        med = statistics.median(t)
        result["variants"][name] = {"tokens_per_s": round(a.new / med, 1), "ms_per_token": round(med * 1000 / a.new, 3)}
    torch_ref = tokens.get("torch-fp16 eager")
    for name, tok in tokens.items():
        if torch_ref is not None and name in result["variants"]:
            result["variants"][name]["tokens_same_as_torch_fp16"] = round(float((tok[0] == torch_ref[0]).mean()), 3)
    for name in [n for n in runs if n.startswith("ort-cuda")]:
        try:
            result["variants"][name]["profile"] = profile(runs[name], ids, a.new)
            log(f"{name}: profiled")
        except Exception as e:  # noqa: BLE001
            result["errors"][f"profile {name}"] = str(e).splitlines()[0][:400]
    a.out.write_text(json.dumps(result, indent=2))
    for name, v in result["variants"].items():
        p = v.get("profile", {})
        print(
            f"{name:55s} {v['tokens_per_s']:8.1f} tok/s"
            + (
                f"  launches/token {p['host_kernel_launches_per_token']} graph {p['graph_launches_per_token']}  GPU busy "
                f"{p['gpu_busy_us_per_token']} us of {p['wall_us_per_token_profiled']} us/token"
                if p
                else ""
            )
        )
    for k, v in result["errors"].items():
        print(f"ERROR {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
