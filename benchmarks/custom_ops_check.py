"""slimline's SkipRMSNorm against its numpy reference and against ONNX Runtime's
SkipSimplifiedLayerNormalization, on each provider asked for, at a decoder's shapes, with and without
a "massive activation" (one value of 24,926 as in SmolLM2's residual: a row mean square of ~1e6,
past fp16's 65504).

    python benchmarks/custom_ops_check.py --providers CPU[,CUDA] [--width 576] --out ops.json

Per case: max abs error against the reference (float32 maths on the same fp16 inputs), whether the
output is finite, and on CUDA the median time per call of both kernels (IO binding, 200 calls).
Where ONNX Runtime's kernel sums squares in fp16 its massive-activation row comes back non-finite or
zeroed; ours must not. Exits 1 if our op misses its reference on any case.
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

PROVIDERS = {"CPU": "CPUExecutionProvider", "CUDA": "CUDAExecutionProvider"}


def single_op(op: str, dtype: type, width: int):
    from onnx import TensorProto, helper

    t = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, t, ["b", "s", width]) for n in ("x", "skip")]
    inputs.append(helper.make_tensor_value_info("gamma", t, [width]))
    if op == "ours":
        node = helper.make_node("SkipRMSNorm", ["x", "skip", "gamma"], ["y", "sum"], domain="ai.slimline", epsilon=1e-5)
        domain = helper.make_opsetid("ai.slimline", 1)
    else:
        node = helper.make_node(
            "SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["y", "", "", "sum"], domain="com.microsoft", epsilon=1e-5
        )
        domain = helper.make_opsetid("com.microsoft", 1)
    outputs = [helper.make_tensor_value_info(n, t, None) for n in ("y", "sum")]
    graph = helper.make_graph([node], op, inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), domain], ir_version=10)


def session(model, provider: str, tmp: Path):
    from slimline.runtime import ort_session

    path = tmp / f"{model.graph.name}-{model.graph.input[0].type.tensor_type.elem_type}.onnx"
    path.write_bytes(model.SerializeToString())
    return ort_session(path, 0, list(dict.fromkeys([provider, "CPUExecutionProvider"])))


def time_calls(sess, feeds: dict, provider: str, calls: int = 200) -> float:
    import onnxruntime as ort

    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    binding = sess.io_binding()
    for k, v in feeds.items():
        binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, device, 0))
    for o in sess.get_outputs():
        binding.bind_output(o.name, device)
    for _ in range(10):
        sess.run_with_iobinding(binding)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> int:
    import tempfile

    from slimline.ops.reference import skip_rms_norm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", default="CPU")
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--timing", action="store_true", help="time both kernels (IO binding)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    cases, failed = [], False
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for prov in a.providers.split(","):
            provider = PROVIDERS[prov]
            for dtype in (np.float16, np.float32):
                ours, theirs = (session(single_op(op, dtype, a.width), provider, Path(tmp)) for op in ("ours", "ort"))
                for shape in ((1, 1, a.width), (1, 512, a.width), (4, 128, a.width)):
                    for massive in (False, True):
                        x = (rng.standard_normal(shape) * 2).astype(dtype)
                        if massive:
                            x[:, 0, 7] = 24926.0
                        skip = rng.standard_normal(shape).astype(dtype)
                        gamma = (rng.standard_normal(a.width) * 0.5 + 1).astype(dtype)
                        feeds = {"x": x, "skip": skip, "gamma": gamma}
                        ref_y, ref_sum = skip_rms_norm(x, skip, gamma, 1e-5)
                        case = {"provider": prov, "dtype": np.dtype(dtype).name, "shape": list(shape), "massive": massive}
                        for label, sess in (("ours", ours), ("ort", theirs)):
                            y, s = sess.run(None, feeds)
                            err = np.abs(y.astype(np.float32) - ref_y.astype(np.float32))
                            case[label] = {
                                "max_abs_error": float(np.nanmax(np.where(np.isfinite(err), err, np.inf))),
                                "finite": bool(np.isfinite(y).all()),
                                "sum_exact": bool((s == ref_sum).all()),
                            }
                            if a.timing:
                                case[label]["us_per_call"] = round(time_calls(sess, feeds, provider), 2)
                        tol = 2e-2 if dtype == np.float16 else 1e-4
                        case["ours_ok"] = case["ours"]["finite"] and case["ours"]["max_abs_error"] <= tol
                        failed |= not case["ours_ok"]
                        cases.append(case)
                        print(
                            f"{prov:4s} {case['dtype']:7s} {str(shape):16s} massive={massive!s:5s} ours err "
                            f"{case['ours']['max_abs_error']:.3g} finite={case['ours']['finite']}"
                            f"{' ' + str(case['ours'].get('us_per_call')) + ' us' if a.timing else ''} | ORT err "
                            f"{case['ort']['max_abs_error']:.3g} finite={case['ort']['finite']}"
                            f"{' ' + str(case['ort'].get('us_per_call')) + ' us' if a.timing else ''}",
                            flush=True,
                        )
    if a.out:
        a.out.write_text(json.dumps({"cases": cases, "all_ours_ok": not failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
