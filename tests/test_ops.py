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
    assert ops.matmul_q4_kernel() in ("avx512vnni", "avx2", "portable")
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


# -- MatMulQ4: 4-bit weights with a float16 minimum per block (GGUF's Q4_1), slimline's CPU kernel ------


def q4_model(k: int, n: int, q: np.ndarray, scales: np.ndarray, mins: np.ndarray, bits: int = 4):
    from onnx import TensorProto, helper, numpy_helper

    from slimline.ops.q4 import pack

    packed = pack(q, scales, mins, bits)
    node = helper.make_node(f"MatMulQ{bits}", ["x", "b", "s", "m"], ["y"], domain=ops.DOMAIN, K=k, N=n, block_size=32)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(v, name) for v, name in zip(packed, "bsm", strict=True)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ops.DOMAIN, 1)], ir_version=10
    )
    return model, packed


def q4_weights(k: int, n: int, seed: int = 0, bits: int = 4):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2**bits, (n, k)).astype(np.uint8)
    scales = (rng.random((n, k // 32)) * 0.02 + 1e-3).astype(np.float16)
    mins = (-rng.random((n, k // 32)) * 0.15).astype(np.float16)
    return q, scales, mins


def test_q4_packing_round_trips_and_places_each_code_where_the_kernel_reads_it():
    from slimline.ops.q4 import LANES, pack, unpack

    q, s, m = q4_weights(96, 37)  # N not a multiple of 16: the last group is padded
    b, ps, pm = pack(q, s, m)
    assert b.shape == (3, 3, 256) and ps.shape == pm.shape == (3, 3, LANES)
    back = unpack(b, ps, pm, 37)
    assert all((x == y).all() for x, y in zip(back, (q, s, m), strict=True))
    g, blk, c, lane, t = 1, 2, 3, 5, 2  # byte c*64 + lane*4 + t: k = 32*blk + 8c + t (low), + 4 (high)
    byte = b[g, blk, c * 64 + lane * 4 + t]
    assert byte & 15 == q[16 * g + lane, 32 * blk + 8 * c + t] and byte >> 4 == q[16 * g + lane, 32 * blk + 8 * c + 4 + t]
    assert (b[2, :, :].reshape(3, 4, LANES, 4)[:, :, 5:] == 0).all()  # columns 37..47 are zero padding
    q, s, m = q4_weights(96, 37, bits=8)  # MatMulQ8: byte c*64 + lane*4 + t holds k = 32*blk + 4c + t
    b, ps, pm = pack(q, s, m, 8)
    assert b.shape == (3, 3, 512)
    assert all((x == y).all() for x, y in zip(unpack(b, ps, pm, 37), (q, s, m), strict=True))
    c = 6
    assert b[g, blk, c * 64 + lane * 4 + t] == q[16 * g + lane, 32 * blk + 4 * c + t]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kernel", ["", "avx2", "portable"])
@pytest.mark.parametrize(("k", "n", "rows"), [(64, 16, 1), (608, 203, 6), (1536, 40, 4)])
def test_q4_kernels_match_the_reference(library, tmp_path, monkeypatch, kernel, k, n, rows, bits):
    """Every kernel (the best the CPU has, AVX2, portable C++) of MatMulQ4 and MatMulQ8 gives the
    reference's numbers, for one row and for rows taken four at a time, N not a multiple of 16, an odd
    block count, an all-zero block."""
    from slimline.ops.reference import dequantize_q4, matmul_q4
    from slimline.runtime import ort_session

    monkeypatch.setenv("SLIMLINE_Q4_KERNEL", kernel)  # read when ORT creates the kernel
    q, s, m = q4_weights(k, n, bits=bits)
    model, packed = q4_model(k, n, q, s, m, bits)
    path = tmp_path / "q4.onnx"
    path.write_bytes(model.SerializeToString())
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    x[0, :32] = 0  # a block of zeros: no activation scale
    y = ort_session(path, 2).run(None, {"x": x})[0]
    ref = matmul_q4(x, *packed, n)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    exact = x @ dequantize_q4(*packed, n).T  # int8 activations cost well under 1% here
    assert np.abs(y - exact).max() < 0.01 * np.abs(exact).max()


def test_q4_rows_give_the_same_bits_alone_or_together(library, tmp_path):
    """Each row's activations are quantized on their own and summed in one order, so a row's output does
    not depend on how many rows run with it: a verify run of draft tokens gives the bits of single steps."""
    from slimline.runtime import ort_session

    q, s, m = q4_weights(576, 100)
    path = tmp_path / "q4.onnx"
    path.write_bytes(q4_model(576, 100, q, s, m)[0].SerializeToString())
    session = ort_session(path, 2)
    x = np.random.default_rng(2).standard_normal((7, 576)).astype(np.float32)
    together = session.run(None, {"x": x})[0]
    alone = np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(7)])
    assert (together == alone).all()


def test_float_minimums_give_q4_1_weights_back_exactly():
    """Weights that were Q4_1 blocks (float16 scale and minimum per 32) come back bit for bit from RTN and
    GPTQ with float minimums; an integer zero point can't hold them."""
    from slimline.quantize import nbits

    q, s, m = q4_weights(128, 48, seed=3)
    blocks = q.reshape(48, 4, 32)
    blocks[..., 3], blocks[..., 17] = 0, 15  # a Q4_1 block spans its range: its minimum is code 0, its maximum 15
    w = (q.reshape(48, 4, 32) * s[..., None].astype(np.float32) + m[..., None].astype(np.float32)).reshape(48, 128).T
    w = np.ascontiguousarray(w, dtype=np.float32)  # [K, N], as a MatMul holds it
    x = np.random.default_rng(4).standard_normal((256, 128)).astype(np.float32)
    for b in (nbits.rtn(w, 4, 32, float_min=True), nbits.gptq(w, x.T @ x, 4, 32, float_min=True)):
        assert (b.q == q).all() and np.abs(b.dequantize() - w).max() < 1e-6
        assert (nbits.pack_q(b)["scales"].reshape(-1) != 0).any()
    integer = nbits.rtn(w, 4, 32)
    assert np.abs(integer.dequantize() - w).max() > 1e-3


def test_float_minimums_find_the_grid_of_k_quant_blocks_whose_codes_dont_span_their_range():
    """GGUF's K-quants (Q4_K) fit each block's scale and minimum by least squares: a block's codes can run
    2..13, so min/max lands off the grid. The grid the values lie on is found, and they come back up to
    the float16 rounding of the block's minimum (not exact in float16 in general: a K-quant's minimum is a
    product), an error 1/20 of min/max's or less; random float weights still get min/max or better."""
    from slimline.quantize import nbits

    rng = np.random.default_rng(8)
    q = rng.integers(2, 14, (40, 128)).astype(np.float32)
    q[:, ::32], q[:, 1::32] = 2, 3  # codes 2..13: neither 0 nor 15 appears
    s = np.repeat((rng.random((40, 4)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32), 32, axis=1)
    m = np.repeat(-(rng.random((40, 4)) * 0.1).astype(np.float16).astype(np.float32), 32, axis=1)
    w = np.ascontiguousarray((q * s + m).T, dtype=np.float32)  # [K, N]
    x = rng.standard_normal((256, 128)).astype(np.float32)
    minmax = np.abs(nbits.rtn(w, 4, 32).dequantize() - w).max()
    for b in (nbits.rtn(w, 4, 32, float_min=True), nbits.gptq(w, x.T @ x, 4, 32, float_min=True)):
        assert np.abs(b.dequantize() - w).max() < min(minmax / 20, 1e-3 * np.abs(w).max())
    plain = rng.standard_normal((128, 40)).astype(np.float32)
    ours, theirs = nbits.rtn(plain, 4, 32, float_min=True), nbits.rtn(plain, 4, 32)
    assert np.square(ours.dequantize() - plain).sum() <= np.square(theirs.dequantize() - plain).sum()


def test_float_minimums_at_8_bits_give_q8_0_weights_back_exactly_and_fit_others_better():
    """GGUF's Q8_0 blocks (int8 codes, float16 scale max|w| / 127) and Q5_0 blocks (d * -16..15) come back
    bit for bit at 8 bits with float minimums (the symmetric grid, the zero-centred lattice among the
    candidates); plain float weights get the min/max grid where it rounds better, so no block's error
    exceeds the symmetric grid's."""
    from slimline.quantize import nbits

    rng = np.random.default_rng(7)
    codes = rng.integers(-127, 128, (48, 128)).astype(np.float32)
    codes[:, ::32] = 127  # Q8_0 puts each block's largest magnitude at +-127
    d = np.repeat((rng.random((48, 4)) * 0.01 + 1e-4).astype(np.float16).astype(np.float32), 32, axis=1)
    w = np.ascontiguousarray((codes * d).T, dtype=np.float32)  # [K, N]
    x = rng.standard_normal((256, 128)).astype(np.float32)
    for b in (nbits.rtn(w, 8, 32, float_min=True), nbits.gptq(w, x.T @ x, 8, 32, float_min=True)):
        assert np.abs(b.dequantize() - w).max() == 0
        assert (nbits.pack_q(b)["B"].shape[-1]) == 512
    d5 = np.repeat((rng.random((48, 4)) * 0.01 + 1e-4).astype(np.float16).astype(np.float32), 32, axis=1)
    q5 = np.ascontiguousarray((rng.integers(-16, 16, (48, 128)) * d5).T, dtype=np.float32)  # GGUF's Q5_0
    assert np.abs(nbits.rtn(q5, 8, 32, float_min=True).dequantize() - q5).max() == 0
    skewed = np.ascontiguousarray(rng.random((128, 48)).astype(np.float32))  # all positive: min/max wins
    groups = skewed.T.reshape(48, 4, 32)
    both = nbits.rtn(skewed, 8, 32, float_min=True)
    sym_scale, sym_zero = nbits._range_params(groups, 8, True, 1.0, float_min=True)
    sym = (np.clip(np.round(groups / sym_scale[..., None] + 128), 0, 255) - 128) * sym_scale[..., None]
    err = lambda deq: np.square(groups - deq).sum(-1)  # noqa: E731
    assert (err(both.dequantize().T.reshape(48, 4, 32)) <= err(sym) + 1e-12).all()
    assert (both.zero != 128).any()


def test_an_8_bit_head_in_blocks_of_32_goes_to_matmul_q8_with_a_tied_gather_q8(library, fused, tmp_path):  # noqa: F811
    import onnx
    from onnx import numpy_helper

    from slimline.compile.export_llm import onnx_stepper
    from slimline.ops.reference import dequantize_q4
    from slimline.quantize.weight_only import WeightOnly

    base = dict(bits=4, block_size=32, max_weight_mb=None, kernel="slimline", min_cosine=0.5)
    r = WeightOnly(**base, head_bits=8, block_size_8bit=32, embedding_bits=8).run(fused.artifact, context(tmp_path / "q8"))
    assert r.report["quantized.MatMulQ8"] == 1 and r.report["quantized.GatherQ8"] == 1
    m = onnx.load(str(r.artifact.path))
    head = next(n for n in m.graph.node if "logits" in n.output)
    gather = next(n for n in m.graph.node if n.op_type == "GatherQ8")
    assert head.op_type == "MatMulQ8" and list(gather.input[:3]) == list(head.input[1:4])
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    n = next(a.i for a in head.attribute if a.name == "N")
    table = dequantize_q4(*(init[i] for i in head.input[1:4]), n)
    tables = onnx.load(str(fused.artifact.path)).graph.initializer
    embedding = next(numpy_helper.to_array(t) for t in tables if list(t.dims) == [n, table.shape[1]])
    assert np.linalg.norm(table - embedding) / np.linalg.norm(embedding) < 0.01  # 8 bits: well under 4 bits' error
    four = WeightOnly(**base, head_bits=4, embedding_bits=4).run(fused.artifact, context(tmp_path / "q4"))
    ids = np.array([[5, 17, 42, 8]])
    ref = onnx_stepper(fused.artifact.path)(ids, reset=True)
    err8, err4 = (np.linalg.norm(onnx_stepper(x.artifact.path)(ids, reset=True) - ref) / np.linalg.norm(ref) for x in (r, four))
    assert err8 < err4, (err8, err4)


def test_weight_only_with_the_slimline_kernel_builds_matmulq4_that_decodes_like_matmulnbits(library, fused, tmp_path):  # noqa: F811
    import onnx

    from slimline.generate import OnnxDecoder
    from slimline.measure.metrics import cosine
    from slimline.quantize.weight_only import WeightOnly

    base = dict(bits=4, block_size=32, algorithm="gptq", head_bits=4, max_weight_mb=None)
    ours = WeightOnly(**base, kernel="slimline").run(fused.artifact, context(tmp_path / "q4"))
    theirs = WeightOnly(**base).run(fused.artifact, context(tmp_path / "nbits"))
    graph = onnx.load(str(ours.artifact.path), load_external_data=False)
    counts = {op: sum(n.op_type == op for n in graph.graph.node) for op in ("MatMulQ4", "MatMulNBits", "MatMul")}
    assert ours.report["quantized.MatMulQ4"] == counts["MatMulQ4"] == theirs.report["quantized.MatMulNBits"] > 0
    assert counts["MatMulNBits"] == 0
    assert ours.report["calibration.mean_cosine"] > 0.99
    ids = np.array([[5, 17, 42, 8, 99, 3]])
    a, b, f = (OnnxDecoder(r.artifact.path, 1) for r in (ours, theirs, fused))
    reference = f.prefill(ids)[:, -1]
    ours_cos, theirs_cos = (cosine(d.prefill(ids)[:, -1], reference).min() for d in (a, b))
    # float minimums fit each block at least as well as integer zero points (random weights, 4 bits)
    assert ours_cos > 0.98 and ours_cos > theirs_cos - 0.005, (ours_cos, theirs_cos)
    assert np.isfinite(a.step(reference.argmax(-1))).all()
    assert not a.exact_multi_token  # int8 activations: prompt lookup warns that its tokens may differ


def test_the_slimline_kernel_refuses_symmetric_weights_and_needs_the_library(tmp_path, monkeypatch):
    from slimline.quantize.weight_only import WeightOnly

    with pytest.raises(ValueError, match="float minimum"):
        WeightOnly(kernel="slimline", symmetric=True)
    monkeypatch.setenv("SLIMLINE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(ops.LIBRARY_ENV, raising=False)
    with pytest.raises(ops.OpsUnavailable, match="slimline ops build"):
        WeightOnly(kernel="slimline").run(None, context(tmp_path / "x"))  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("index_type", [np.int64, np.int32])
def test_gather_q4_reads_rows_of_a_matmul_q4_table(library, tmp_path, index_type, bits):
    from onnx import TensorProto, helper, numpy_helper

    from slimline.ops.q4 import pack
    from slimline.ops.reference import gather_q4
    from slimline.runtime import ort_session

    q, s, m = q4_weights(96, 37, bits=bits)
    packed = pack(q, s, m, bits)
    node = helper.make_node(f"GatherQ{bits}", ["b", "s", "m", "ids"], ["y"], domain=ops.DOMAIN, K=96, N=37, block_size=32)
    itype = TensorProto.INT64 if index_type == np.int64 else TensorProto.INT32
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("ids", itype, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, name) for v, name in zip(packed, "bsm", strict=True)],
    )
    path = tmp_path / "g.onnx"
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ops.DOMAIN, 1)], ir_version=10
    )
    path.write_bytes(model.SerializeToString())
    session = ort_session(path, 1)
    ids = np.array([[0, 36, 17], [16, 5, -1]], index_type)
    y = session.run(None, {"ids": ids})[0]
    assert y.shape == (2, 3, 96)
    np.testing.assert_array_equal(y, gather_q4(*packed, 37, ids % 37))
    with pytest.raises(Exception, match="out of range"):
        session.run(None, {"ids": np.array([[37]], index_type)})


def test_a_tied_embedding_reads_the_matmul_q4_heads_table(library, fused, tmp_path):  # noqa: F811
    """kernel: slimline with a 4-bit head and embedding: GatherQ4 reads the head's packed initializers
    themselves (one table on disk and in memory), and the rows it returns are the head's weights."""
    import onnx
    from onnx import numpy_helper

    from slimline.compile.export_llm import onnx_stepper
    from slimline.ops.reference import gather_q4
    from slimline.quantize.weight_only import WeightOnly

    base = dict(bits=4, block_size=32, head_bits=4, min_cosine=0.5, max_weight_mb=None, kernel="slimline")
    r = WeightOnly(**base, embedding_bits=4).run(fused.artifact, context(tmp_path / "tied"))
    assert r.report["embedding_error.node_embedding"] == "shared with the LM head"
    assert r.report["quantized.GatherQ4"] == 1
    m = onnx.load(str(r.artifact.path))
    gather = next(n for n in m.graph.node if n.op_type == "GatherQ4")
    head = next(n for n in m.graph.node if n.op_type == "MatMulQ4" and "logits" in n.output)
    assert list(gather.input[:3]) == list(head.input[1:4])  # the very same initializers
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    vocab = next(a.i for a in head.attribute if a.name == "N")
    rows = gather_q4(*(init[n] for n in head.input[1:4]), vocab, np.array([5, 17]))
    assert rows.shape == (2, next(a.i for a in head.attribute if a.name == "K"))
    float_embedding = WeightOnly(**base).run(fused.artifact, context(tmp_path / "f"))
    ids = np.array([[5, 17, 42, 8]])
    a = onnx_stepper(r.artifact.path)(ids, reset=True)
    b = onnx_stepper(float_embedding.artifact.path)(ids, reset=True)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.3  # a misread table gives ~1


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kernel", ["", "avx2", "portable"])
def test_q4_kernels_hold_the_largest_sums_without_saturating(library, tmp_path, monkeypatch, kernel, bits):
    """Every code at its largest (15; 255 for MatMulQ8) against activations all at +-127: the AVX2
    kernel's 16-bit partial sums reach 30480 per block at 4 bits, and 8-bit pairs would reach 64770 as
    they are, and must not saturate. Codes 0 (-128 as signed int8) too."""
    from slimline.ops.reference import matmul_q4
    from slimline.runtime import ort_session

    monkeypatch.setenv("SLIMLINE_Q4_KERNEL", kernel)
    k, n, top = 128, 32, 2**bits - 1
    q = np.full((n, k), top, np.uint8)
    q[16:] = 0
    s = np.full((n, k // 32), 0.01, np.float16)
    m = np.full((n, k // 32), -0.05, np.float16)
    model, packed = q4_model(k, n, q, s, m, bits)
    path = tmp_path / "q4.onnx"
    path.write_bytes(model.SerializeToString())
    x = np.stack([np.full(k, 3.0), np.full(k, -3.0), np.tile([3.0, -3.0], k // 2)]).astype(np.float32)
    y = ort_session(path, 1).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, matmul_q4(x, *packed, n), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y[0, :16], 128 * 3.0 * (top * 0.01 - 0.05), rtol=1e-3)
    np.testing.assert_allclose(y[0, 16:], 128 * 3.0 * -0.05, rtol=1e-3)


def test_q4_0_weights_with_whole_number_zero_points_still_go_to_matmul_q4(library, tmp_path):
    """GGUF's Q4_0 blocks (w = d * (q - 8)) fit with zero points of exactly 8: the format decides the
    kernel, not whether the zero points happen to be whole numbers."""
    import onnx

    from slimline.quantize import nbits
    from slimline.quantize.common import single_matmul
    from slimline.quantize.weight_only import replace_matmuls
    from slimline.runtime import ort_session

    rng = np.random.default_rng(5)
    q = rng.integers(0, 16, (40, 96)).astype(np.float32)
    q[:, ::32], q[:, 1::32] = 0, 15  # each block spans its range
    d = np.repeat((rng.random((40, 3)) * 0.02 + 0.001).astype(np.float16).astype(np.float32), 32, axis=1)  # GGUF's fp16 d
    w = np.ascontiguousarray(((q - 8) * d).T, dtype=np.float32)  # [K, N]
    b = nbits.rtn(w, 4, 32, float_min=True)
    assert (b.zero == 8).all() and np.abs(b.dequantize() - w).max() < 1e-6
    m = single_matmul(96, 40)
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, m.graph.initializer[0].name))
    out = replace_matmuls(m, {"mm": b}, accuracy_level=4, kernel="slimline")
    assert [n.op_type for n in out.graph.node] == ["MatMulQ4"]
    onnx.save_model(out, str(tmp_path / "q.onnx"))
    x = np.random.default_rng(6).standard_normal((3, 96)).astype(np.float32)
    y = ort_session(tmp_path / "q.onnx", 1).run(None, {"X": x})[0]
    assert np.abs(y - x @ w).max() < 0.03 * np.abs(x @ w).max()  # int8 activations
