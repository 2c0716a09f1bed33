"""slimline's MatMulQ4 (MatMulQ8) against ONNX Runtime's MatMulNBits, op by op, on SmolLM2's weight shapes.

    .venv/bin/python benchmarks/matmul_q4.py [--rounds 3] [--threads 2] [--bits 8]

Each case is a graph of many independent matrix products of one shape reading one activation, so
that the weights (~80 MB for the decode cases) come from memory as a decode step's do, not from the
cache. The kernels: MatMulQ4 (4-bit codes, float16 scale and minimum per block of 32: 20 bytes per
32 weights) and MatMulNBits at ``accuracy_level`` 4 with integer zero points in blocks of 32 (what
``kernel: ort`` writes; 24 bytes once ONNX Runtime has packed it) and of 128 (fewer bytes, a coarser
grid). Every (case, kernel) runs in a fresh process with ORT's threads spinning, as a server runs
one session; kernels alternate within each round and the order reverses every round (ABBA). Medians
of the per-run times; the load of the machine is printed before and after.

``--bits 8``: MatMulQ8 (8-bit codes, float16 scale and minimum per 32: 36 bytes per 32 weights, what
an exact copy of a GGUF's Q8_0 LM head takes) against MatMulNBits 8-bit in blocks of 32, with
MatMulQ4 beside them, on the decode cases.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

# (name, K, N, rows, copies): SmolLM2-135M's layers at decode (1 row) and in prompts
CASES = [
    ("o_proj 576x576, decode", 576, 576, 1, 150),
    ("qkv 576x960, decode", 576, 960, 1, 150),
    ("gate/up 576x3072, decode", 576, 3072, 1, 48),
    ("down 1536x576, decode", 1536, 576, 1, 150),
    ("lm head 576x49152, decode", 576, 49152, 1, 4),
    ("gate/up 576x3072, 32-token prompt", 576, 3072, 32, 8),
    ("gate/up 576x3072, 512-token prompt", 576, 3072, 512, 2),
]
KERNELS = {4: ["MatMulQ4", "MatMulNBits b32", "MatMulNBits b128"], 8: ["MatMulQ8", "MatMulNBits8 b32", "MatMulQ4"]}


def graph(kernel: str, k: int, n: int, rows: int, copies: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    from slimline.ops import DOMAIN

    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for r in range(copies):
        if kernel.startswith("MatMulQ"):
            groups, blocks, bits = -(-n // 16), k // 32, int(kernel[-1])
            parts = [
                rng.integers(0, 256, (groups, blocks, 64 * bits), dtype=np.uint8),
                (rng.random((groups, blocks, 16)) * 0.02).astype(np.float16),
                (-rng.random((groups, blocks, 16)) * 0.1).astype(np.float16),
            ]
            attrs, domain = {"K": k, "N": n, "block_size": 32}, DOMAIN
        else:
            block = int(kernel.rsplit("b", 1)[1])
            bits = 8 if kernel.startswith("MatMulNBits8") else 4
            blocks = -(-k // block)
            parts = [
                rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8),
                (rng.random(n * blocks) * 0.02).astype(np.float32),
                rng.integers(0, 256, n * (blocks if bits == 8 else -(-blocks // 2)), dtype=np.uint8),
            ]
            attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 4}
            domain = "com.microsoft"
        names = [f"w{r}_{i}" for i in range(3)]
        inits += [numpy_helper.from_array(p, nm) for p, nm in zip(parts, names, strict=True)]
        op = kernel if kernel.startswith("MatMulQ") else "MatMulNBits"
        nodes.append(helper.make_node(op, ["x", *names], [f"y{r}"], domain=domain, **attrs))
        outs.append(helper.make_tensor_value_info(f"y{r}", TensorProto.FLOAT, [rows, n]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])], outs, inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(g, opset_imports=opsets, ir_version=10).SerializeToString()


def worker(kernel: str, case: int, threads: int) -> list[float]:
    import onnxruntime as ort

    from slimline import ops

    _, k, n, rows, copies = CASES[case]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(ops.require()))
    session = ort.InferenceSession(graph(kernel, k, n, rows, copies), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(15):
        t = time.perf_counter()
        session.run(None, {"x": x})
        times.append((time.perf_counter() - t) / copies)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="8: MatMulQ8 against 8-bit MatMulNBits, decode cases")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--case", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.case, a.threads)))
        return
    from slimline import ops
    from slimline.measure.timer import cpu_busy

    ops.require()
    print(f"MatMulQ4 kernel on this CPU: {ops.matmul_q4_kernel()}; {a.threads} threads")
    print(f"other processes keep {cpu_busy():.0%} of the CPUs busy before timing", flush=True)
    kernels = KERNELS[a.bits]
    ours, *others = kernels
    print(f"| case | {' us | '.join(kernels)} us | {' | '.join(f'{ours} vs {o}' for o in others)} |")
    print("|---|" + "---|" * (2 * len(kernels) - 1))
    for case, (name, *_rest, rows, _copies) in enumerate(CASES):
        if a.bits == 8 and rows > 1:
            continue
        times: dict[str, list[float]] = {kern: [] for kern in kernels}
        for r in range(a.rounds):
            for kern in kernels if r % 2 == 0 else reversed(kernels):
                cmd = [sys.executable, __file__, "--worker", kern, "--case", str(case), "--threads", str(a.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                times[kern] += json.loads(out.strip().splitlines()[-1])
        med = {kern: statistics.median(v) * 1e6 for kern, v in times.items()}
        cells = " | ".join(f"{med[kern]:.1f}" for kern in kernels)
        ratios = " | ".join(f"{med[o] / med[ours]:.2f}x" for o in others)
        print(f"| {name} | {cells} | {ratios} |", flush=True)
    print(f"\nother processes kept {cpu_busy():.0%} of the CPUs busy after timing")


if __name__ == "__main__":
    main()
