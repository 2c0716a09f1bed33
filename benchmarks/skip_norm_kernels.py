"""ONNX Runtime's CPU Skip*LayerNormalization kernels against the ops they replace, one node each.

    .venv/bin/python benchmarks/skip_norm_kernels.py [--threads 2 --repeats 40]

For MiniLM's width (384, with BERT's bias input) and SmolLM2's (576, no bias), at 1, 128, 512 and
4,096 rows: the fused node against Add (+ Add bias) + (Simplified)LayerNormalization, built with
slimline's own rewrite (``slimline.compile.tune.unfuse``). Graph optimizations are off in both
sessions, so each runs the kernels as written (ORT would otherwise be free to fuse the plain form
back). Both are timed interleaved and their medians printed, with the largest difference between
their outputs. ``compile.tune`` makes the decision on whole graphs; this shows where it comes from.
"""

from __future__ import annotations

import argparse

import numpy as np


def graph(op: str, rows: int, width: int, bias: bool):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    names = ["gamma"] + ([] if op == "SkipSimplifiedLayerNormalization" else ["beta"]) + (["bias"] if bias else [])
    inputs = ["x", "skip", "gamma"]
    if op == "SkipLayerNormalization":
        inputs += ["beta", "bias"] if bias else ["beta"]
    elif bias:
        inputs += ["bias"]
    weights = [numpy_helper.from_array(rng.random(width, dtype=np.float32), n) for n in names]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, rows, width]) for n in ("x", "skip")]
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", name="norm", epsilon=1e-6)
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, width])]
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(helper.make_graph([node], "g", io, out, weights), opset_imports=opsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()

    import onnx
    import onnxruntime as ort

    from slimline.compile.fusions.unfuse import unfuse
    from slimline.measure.timer import cpu_busy, interleave, median

    print(f"onnxruntime {ort.__version__}, {args.threads} threads; other processes keep {cpu_busy():.0%} of the CPUs busy")
    print(f"{'op':34s} {'rows':>5s} {'fused us':>9s} {'unfused us':>10s} {'fused/unfused':>13s} {'max diff':>9s}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for op, width, bias in (("SkipLayerNormalization", 384, True), ("SkipSimplifiedLayerNormalization", 576, False)):
        for rows in (1, 128, 512, 4096):
            fused = graph(op, rows, width, bias)
            plain = onnx.ModelProto.FromString(fused.SerializeToString())
            unfuse(plain, op)
            sessions = [
                ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]) for m in (fused, plain)
            ]
            rng = np.random.default_rng(1)
            feeds = {n: rng.standard_normal((1, rows, width), dtype=np.float32) for n in ("x", "skip")}
            outs = [s.run(None, feeds)[0] for s in sessions]
            times = interleave({i: lambda s=s, f=feeds: s.run(None, f) for i, s in enumerate(sessions)}, args.repeats)
            a, b = (median(times[i]) * 1e6 for i in (0, 1))
            print(
                f"{op + (' + bias' if bias else ''):34s} {rows:5d} {a:9.1f} {b:10.1f} {a / b:13.2f} {np.abs(outs[0] - outs[1]).max():9.1e}"
            )


if __name__ == "__main__":
    main()
