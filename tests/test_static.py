"""Static int8, SmoothQuant, fp16 and bitsandbytes on the tiny BERT: what they do, report and refuse."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from slimline.errors import DataError, StageError
from slimline.measure.data import TextData
from slimline.models import load_model
from slimline.quantize.bnb import BitsAndBytes
from slimline.quantize.fp16 import Fp16
from slimline.quantize.smoothquant import SmoothQuant
from slimline.quantize.static import StaticInt8, activation_quant
from slimline.stage import Context
from tests.test_compile import context
from tests.test_quantize import fused  # noqa: F401 - module fixture


def test_static_quantizes_activations_of_the_fused_graph(fused, tmp_path):  # noqa: F811
    """Without inferred types the fused graph's activations silently stayed float: now every MatMul gets a QDQ pair."""
    result = StaticInt8().run(fused, context(tmp_path))
    r = result.report
    assert r["quantized_layers"] == 6 and r["QuantizeLinear"] == 6  # inputs only: outputs stay float
    assert r["float.Attention"] == 2
    assert 0 < r["layer_error.max"] < 0.1 and r["calibration.mean_cosine"] > 0.98
    q = onnx.load(str(result.artifact.path))
    scales = activation_quant(q)
    assert len(scales) == 6 and all(s > 0 and 0 <= z <= 255 for s, z, _, _ in scales.values())


@pytest.mark.parametrize("method", ["Entropy", "Percentile"])
def test_histogram_calibrators_run_on_variable_length_text(fused, tmp_path, method):  # noqa: F811
    r = StaticInt8(calibrate_method=method).run(fused, context(tmp_path)).report
    assert r["quantized_layers"] == 6 and r["calibrate_method"] == method


def test_static_fallback_keeps_the_worst_layer(fused, tmp_path):  # noqa: F811
    errors = StaticInt8().run(fused, context(tmp_path / "a")).report["layer_errors"]
    second, first = sorted(errors.values())[-2:]
    worst = max(errors, key=errors.get)
    r = StaticInt8(fallback="auto", max_layer_error=(first + second) / 2).run(fused, context(tmp_path / "b")).report
    assert r["fallback_kept"] == 1 and f"fallback.{worst}" in r and r["quantized_layers"] == 5


def test_static_needs_data(fused, tmp_path):  # noqa: F811
    with pytest.raises(StageError, match="needs data"):
        StaticInt8().run(fused, Context(workdir=tmp_path))
    empty = TextData("none", calibration=[], evaluation=["x"])
    with pytest.raises(DataError, match="got 0"):
        StaticInt8().run(fused, Context(workdir=tmp_path, load_data=lambda: empty))


def outlier_model(fused, tmp_path):  # noqa: F811
    """The tiny fused graph with one huge activation channel into every FFN-in MatMul, whose weight row is
    correspondingly small (as in real BERTs: the outlier channel sets the int8 range but carries little)."""
    from onnx import numpy_helper

    m = onnx.load(str(fused.path))
    init = {t.name: t for t in m.graph.initializer}

    def scale(name: str, index: int, factor: float) -> None:
        a = numpy_helper.to_array(init[name]).copy()
        a[index] *= factor
        init[name].CopyFrom(numpy_helper.from_array(a, name))

    for node in m.graph.node:
        if node.op_type == "SkipLayerNormalization":
            scale(node.input[2], 3, 200.0)  # gamma
            for reader in m.graph.node:
                if reader.op_type == "MatMul" and reader.input[0] == node.output[0]:
                    scale(reader.input[1], 3, 1 / 200)  # the weight row that reads channel 3
    path = tmp_path / "outlier.onnx"
    onnx.save_model(m, str(path))
    return type(fused)(path, fused.tokenizer, fused.info, fused.config)


def test_smoothquant_is_exact_in_float_and_lowers_activation_range(fused, tmp_path):  # noqa: F811
    art = outlier_model(fused, tmp_path)
    r = SmoothQuant(alpha=0.5).run(art, context(tmp_path)).report
    assert r["float_output_change"] < 1e-4
    assert r["act_max.largest_after"] < r["act_max.largest_before"] / 3
    assert r["inserted_mul"] == r["activations"]  # post-norm BERT: the norm output is also the residual


def test_smoothquant_lowers_static_int8_error_on_outlier_channels(fused, tmp_path):  # noqa: F811
    art = outlier_model(fused, tmp_path)
    only = ["*intermediate*"]
    plain = StaticInt8().run(art, context(tmp_path / "p")).report
    smoothed = SmoothQuant(include=only).run(art, context(tmp_path / "s")).artifact
    after = StaticInt8().run(smoothed, context(tmp_path / "q")).report

    def ffn_in(r):
        return max(v for k, v in r["layer_errors"].items() if "intermediate" in k)

    assert ffn_in(after) < 0.5 * ffn_in(plain)


def test_smoothquant_include_takes_roles(fused, tmp_path):  # noqa: F811
    art = outlier_model(fused, tmp_path)
    by_glob = SmoothQuant(include=["*intermediate*"]).run(art, context(tmp_path / "g")).report
    by_role = SmoothQuant(include=["role:ffn.in"]).run(art, context(tmp_path / "r")).report
    assert by_role["activations"] == by_glob["activations"] == 2  # the FFN input of each of the 2 layers
    assert by_role["act_max.largest_after"] == by_glob["act_max.largest_after"]
    with pytest.raises(ValueError, match="ffn.middle"):
        SmoothQuant(include=["role:ffn.middle"])


def test_smoothquant_folds_into_a_norm_read_only_by_the_matmuls(tmp_path):
    """Pre-norm (Llama-style): LayerNormalization -> MatMul only; 1/s goes into gamma/beta, no Mul is added."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k = 16
    inits = [
        numpy_helper.from_array(np.ones(k, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(k, np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((k, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((50, k)).astype(np.float32), "E"),
    ]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], name="norm", axis=-1),
        helper.make_node("MatMul", ["n", "W"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "prenorm",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])],
        inits,
    )
    path = tmp_path / "prenorm.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))

    class Tok:
        def __call__(self, texts, **_):
            ids = np.array([[hash(w) % 50 for w in (t.split() + ["pad"] * 6)[:6]] for t in texts])
            return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    from slimline.artifact import ModelInfo, OnnxModel

    art = OnnxModel(path, Tok(), ModelInfo("x", tmp_path, "feature-extraction"), None)
    ctx = context(tmp_path)
    # keep graph input attention_mask unused but present: ORT accepts it
    r = SmoothQuant().run(art, ctx).report
    assert r["folded_into_norm"] == 1 and r["inserted_mul"] == 0 and r["float_output_change"] < 1e-4


def test_fp16_halves_weights_keeps_norms_in_fp32_and_reports_error(fused, tmp_path):  # noqa: F811
    r = Fp16().run(fused, context(tmp_path)).report
    assert r["fp16_initializers"] > 0 and "SkipLayerNormalization" in r["fp32_islands"]
    assert r["calibration.mean_cosine"] > 0.999


def test_fp16_refuses_a_quantized_model(fused, tmp_path):  # noqa: F811
    q = StaticInt8().run(fused, context(tmp_path / "a")).artifact
    with pytest.raises(StageError, match="already quantized"):
        Fp16().run(q, context(tmp_path / "b"))


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_bitsandbytes_runs_on_cpu_reports_error_and_saves_a_reloadable_model(tmp_path, scheme):
    from slimline.pipeline import save_final
    from tests.models import tiny_bert

    art = load_model(str(tiny_bert(tmp_path / "m", hidden=64)))  # bitsandbytes' CPU 4-bit path needs K >= 64
    ctx = context(tmp_path)
    result = BitsAndBytes(scheme=scheme, exclude=["pooler.*"]).run(art, ctx)
    r = result.report
    assert r["quantized_linears"] == 12 and r["param_mb.after"] < r["param_mb.before"]
    assert r["reload_max_abs_diff"] <= 1e-3 and r["calibration.mean_cosine"] > 0.9
    assert 0 < r["layer_error.max"] < (0.05 if scheme == "int8" else 0.3)
    out = tmp_path / "final"
    out.mkdir()
    save_final(result.artifact, out)
    assert (out / "model" / "config.json").exists()


def test_fp16_ranges_measure_peaks_and_the_rows_each_skip_norm_sums(tmp_path):
    """The range check's numbers, against numpy: each tensor's largest |value|, and the row mean square
    of input + skip + bias that the CUDA Skip norms accumulate (bias is input 4 of SkipLayerNormalization
    and input 3 of SkipSimplifiedLayerNormalization)."""
    from onnx import TensorProto, helper, numpy_helper

    from slimline.quantize.fp16 import fp16_ranges

    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal(8).astype(np.float32) for n in ("g", "b", "bias", "bias2")}
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["big"], name="mul"),
        helper.make_node("SkipLayerNormalization", ["big", "s", "g", "b", "bias"], ["y1"], domain="com.microsoft", name="sln"),
        helper.make_node(
            "SkipSimplifiedLayerNormalization", ["y1", "s", "g", "bias2"], ["y2"], domain="com.microsoft", name="ssln"
        ),
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in w.items()] + [numpy_helper.from_array(np.float32(300.0), "k")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 8]) for n in ("x", "s")]
    graph = helper.make_graph(nodes, "g", io, [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    feeds = [{"x": rng.standard_normal((1, 4, 8)).astype(np.float32), "s": rng.standard_normal((1, 4, 8)).astype(np.float32)}]
    peaks, squares = fp16_ranges(model, set(), set(), feeds, 1, tmp_path)
    x, s = feeds[0]["x"].astype(np.float64), feeds[0]["s"].astype(np.float64)
    assert peaks["big"] == pytest.approx(np.abs(300 * x).max(), rel=1e-5)
    assert squares["sln"] == pytest.approx(((300 * x + s + w["bias"]) ** 2).mean(-1).max(), rel=1e-5)
    t = 300 * x + s + w["bias"]
    y1 = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-12) * w["g"] + w["b"]
    assert peaks["y1"] == pytest.approx(np.abs(y1).max(), rel=1e-4)
    assert squares["ssln"] == pytest.approx(((y1 + s + w["bias2"]) ** 2).mean(-1).max(), rel=1e-4)
    # a kept op type is neither measured as a norm nor counted unless an fp16 node reads its output
    _, kept = fp16_ranges(model, {"SkipLayerNormalization"}, set(), feeds, 1, tmp_path)
    assert "sln" not in kept and "ssln" in kept
