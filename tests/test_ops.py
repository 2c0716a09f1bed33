"""slimline's own custom-op library (slimline.ops): built from source, its kernels held to the numpy
reference, the compile.fuse rewrite into it, fp16 without fp32 islands, and the errors when it's missing.
The CUDA kernels are built here where nvcc is found, and run on a GPU by benchmarks/custom_ops_check.py."""

from __future__ import annotations

import numpy as np
import pytest

from slimline import ops
from slimline.ops.build import build, build_dir, find_nvcc
from slimline.ops.reference import skip_rms_norm
from tests.test_compile import context
from tests.test_llm import exported, fused, llama  # noqa: F401 - module fixtures


@pytest.fixture(scope="module")
def library():
    built = build(say=lambda m: None)
    if built.cpu is None:
        pytest.skip(f"slimline's custom ops can't be built here: {'; '.join(built.notes)}")
    return built


def single_op(dtype, width, sum_out=True, epsilon=1e-5):
    from onnx import TensorProto, helper

    t = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, t, ["b", "s", width]) for n in ("x", "skip")]
    inputs.append(helper.make_tensor_value_info("gamma", t, [width]))
    outputs = [helper.make_tensor_value_info("y", t, None)] + ([helper.make_tensor_value_info("sum", t, None)] if sum_out else [])
    node = helper.make_node(
        "SkipRMSNorm", ["x", "skip", "gamma"], ["y", "sum" if sum_out else ""], domain=ops.DOMAIN, epsilon=epsilon
    )
    graph = helper.make_graph([node], "g", inputs, outputs)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ops.DOMAIN, 1)], ir_version=10
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("sum_out", [True, False])
def test_cpu_kernel_matches_the_reference_and_survives_a_massive_activation(library, tmp_path, dtype, sum_out):
    from slimline.runtime import ort_session

    path = tmp_path / "op.onnx"
    path.write_bytes(single_op(dtype, 576, sum_out).SerializeToString())
    session = ort_session(path, 1)  # registers the library: the model uses ai.slimline
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 7, 576)) * 3).astype(dtype)
    x[0, 0, 7] = 24926.0  # SmolLM2's first-position activation: mean square ~1e6, past fp16's range
    skip = rng.standard_normal(x.shape).astype(dtype)
    gamma = rng.standard_normal(576).astype(dtype)
    out = session.run(None, {"x": x, "skip": skip, "gamma": gamma})
    y, s = skip_rms_norm(x, skip, gamma, 1e-5)
    assert np.isfinite(out[0]).all() and out[0].dtype == dtype
    np.testing.assert_allclose(
        out[0].astype(np.float32), y.astype(np.float32), atol=4e-3 if dtype == np.float16 else 1e-5, rtol=1e-5
    )
    if sum_out:
        assert (out[1] == s).all()


def test_the_reference_is_what_an_fp16_accumulator_gets_wrong():
    """The point of the op: in fp16 the row's sum of squares overflows (as in ONNX Runtime's CUDA kernel);
    accumulated in fp32 it doesn't, and the row is normalised, not zeroed."""
    x = np.zeros((1, 576), np.float16)
    x[0, 7] = 24926.0
    y, _ = skip_rms_norm(x, np.zeros_like(x), np.ones(576, np.float16))
    with np.errstate(over="ignore"):  # the overflow is the point
        half_mean_square = (x.astype(np.float16) * x.astype(np.float16)).sum(dtype=np.float16) / np.float16(576)
    assert not np.isfinite(half_mean_square)
    assert abs(float(y[0, 7]) - np.sqrt(576)) < 0.1 and np.isfinite(y).all()


def test_build_is_cached_by_source_hash_and_holds_the_cuda_kernels_where_nvcc_is(library):
    assert library.cpu == build_dir() / "libslimline_ops.so" and ops.library() == library.cpu
    again = build(say=lambda m: pytest.fail(f"rebuilt: {m}"))  # nothing changed: nothing compiled
    assert again.cpu == library.cpu
    if find_nvcc():
        assert library.cuda is not None and ops.library(cuda=True) == library.cuda
        import ctypes

        assert ctypes.CDLL(str(library.cuda)).SlimlineOpsProviders  # the exported symbol is there
    else:
        assert any("nvcc not found" in n for n in library.notes)


def test_fuse_custom_ops_rewrites_skip_norms_and_fp16_keeps_no_fp32_island(library, exported, fused, tmp_path):  # noqa: F811
    import onnx

    from slimline.compile.fuse import Fuse
    from slimline.generate import OnnxDecoder
    from slimline.measure.metrics import cosine
    from slimline.quantize.fp16 import Fp16

    r = Fuse(expect={"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 3}, custom_ops=True).run(
        exported.artifact, context(tmp_path / "f")
    )
    assert r.report["custom_ops.SkipRMSNorm"] == r.report["fused.SkipSimplifiedLayerNormalization"] >= 3
    assert r.report["contract"] == "met"
    assert r.report["parity.max_abs_error"] < 1e-3
    graph = onnx.load(str(r.artifact.path), load_external_data=False)
    assert not [n for n in graph.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert any(o.domain == ops.DOMAIN for o in graph.opset_import)
    half = Fp16(keep_float=["Softmax"], min_cosine=0.99).run(r.artifact, context(tmp_path / "h"))
    assert half.report["fp32_islands"] == "none" and half.report["calibration.mean_cosine"] > 0.999
    a, b = OnnxDecoder(half.artifact.path, 1), OnnxDecoder(fused.artifact.path, 1)
    ids = np.array([[5, 17, 42, 8]])
    assert cosine(a.prefill(ids)[:, -1], b.prefill(ids)[:, -1]).min() > 0.999


def test_a_model_that_needs_the_ops_without_the_library_is_a_clear_error(tmp_path, monkeypatch):
    from slimline.runtime import ort_session

    path = tmp_path / "op.onnx"
    path.write_bytes(single_op(np.float32, 8).SerializeToString())
    monkeypatch.setenv("SLIMLINE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(ops.LIBRARY_ENV, raising=False)
    assert ops.uses_ops(path) and ops.library() is None
    with pytest.raises(ops.OpsUnavailable, match="slimline ops build"):
        ort_session(path, 1)


def test_a_build_without_headers_or_compiler_says_why_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLINE_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("SLIMLINE_ORT_HEADERS", str(tmp_path / "nowhere"))
    built = build(say=lambda m: None)
    assert built.cpu is None and "SLIMLINE_ORT_HEADERS" in built.notes[0]
    assert "no custom ops" in ops.why_unavailable() and ops.library() is None


def test_placement_reads_each_nodes_provider_from_the_profile(tmp_path):
    from onnx import TensorProto, helper

    from slimline.evaluate.placement import placement

    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="relu"),
        helper.make_node("Shape", ["y"], ["s"], name="shape"),
        helper.make_node("Reshape", ["y", "s"], ["z"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString())
    p = placement(path, ["CPUExecutionProvider"], {"x": np.ones((2, 3), np.float32)})
    assert p.providers["relu"] == "CPUExecutionProvider" and p.ops["relu"] == "Relu"
    assert "relu" in p.fallbacks and "shape" not in p.fallbacks  # on a CPU-only run everything is "on the CPU"
    assert p.summary()["cpu_fallback_nodes"][0] == "relu (Relu)"


def test_a_required_gpu_target_fails_on_nodes_placed_on_the_cpu():
    from slimline.evaluate.budgets import Budgets, check_budgets

    summary = {"ort-cuda": {"cpu_fallback_nodes": ["q (QAttention)", "m (MatMulInteger)"]}}
    rows = check_budgets(Budgets(), summary, [], ["ort-cuda"])
    row = next(r for r in rows if r["name"] == "cpu_fallback_nodes")
    assert not row["passed"] and row["value"] == 2 and "q (QAttention)" in row["note"]
    ok = check_budgets(Budgets(), {"ort-cuda": {"cpu_fallback_nodes": []}}, [], ["ort-cuda"])
    assert next(r for r in ok if r["name"] == "cpu_fallback_nodes")["passed"]
    assert not [r for r in check_budgets(Budgets(), summary, [], []) if r["name"] == "cpu_fallback_nodes"]  # not required
