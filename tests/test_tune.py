"""compile.tune: the unfused forms compute what the fused ops do, and the stage keeps the faster graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from slimline.compile.fusions.unfuse import unfuse
from slimline.compile.tune import Tune, node_error
from slimline.measure.inputs import sample_feeds
from slimline.runtime import ort_function
from tests.test_compile import context
from tests.test_llm import exported, llama  # noqa: F401 - module fixtures
from tests.test_llm import fused as fused_llama  # noqa: F401 - module fixture
from tests.test_quantize import fused  # noqa: F401 - module fixture


def _outputs(path, artifact, texts=()):
    run, inputs = ort_function(path)
    return {
        case: next(iter(run(feeds).values())) for case, feeds in sample_feeds(artifact.tokenizer, inputs, list(texts)).items()
    }


def test_unfused_skip_layer_norm_computes_what_the_fused_node_does(fused, tmp_path):  # noqa: F811
    model = onnx.load(str(fused.path))
    skips = sum(n.op_type == "SkipLayerNormalization" for n in model.graph.node)
    assert skips == 4 and node_error(model, "SkipLayerNormalization") < 1e-5
    assert unfuse(model, "SkipLayerNormalization") == skips
    ops = [n.op_type for n in model.graph.node]
    assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == skips
    path = tmp_path / "unfused.onnx"
    onnx.save(model, str(path))
    a, b = _outputs(fused.path, fused), _outputs(path, fused)
    for case in a:
        np.testing.assert_allclose(a[case], b[case], atol=1e-4, err_msg=case)


def _with_gelu_bias(path):
    """The tiny model's FFN bias is zero: give BiasGelu a real one, so that dropping it would show."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    names = {n.input[1] for n in model.graph.node if n.op_type == "BiasGelu"}
    for t in model.graph.initializer:
        if t.name in names:
            shape = numpy_helper.to_array(t).shape
            t.CopyFrom(numpy_helper.from_array(np.random.default_rng(1).standard_normal(shape).astype(np.float32), t.name))
    return model


def test_unfused_bias_gelu_computes_what_the_fused_node_does(fused, tmp_path):  # noqa: F811
    from slimline.compile.fusions.unfuse import bias_gelu

    model = _with_gelu_bias(fused.path)
    biased = tmp_path / "biased.onnx"
    onnx.save(model, str(biased))
    gelus = sum(n.op_type == "BiasGelu" for n in model.graph.node)
    assert gelus == 2 and node_error(model, "BiasGelu") < 1e-5
    assert bias_gelu(model) == gelus
    ops = [n.op_type for n in model.graph.node]
    assert "BiasGelu" not in ops and ops.count("Gelu") == gelus
    path = tmp_path / "unfused.onnx"
    onnx.save(model, str(path))
    a, b = _outputs(biased, fused), _outputs(path, fused)
    for case in a:
        np.testing.assert_allclose(a[case], b[case], atol=1e-4, err_msg=case)


def test_node_error_sees_a_wrong_unfused_form(fused, monkeypatch):  # noqa: F811
    """The per-node check can fail: an unfused form that drops the bias is caught."""
    import dataclasses

    from slimline.compile import tune
    from slimline.compile.fusions import unfuse as unfuse_module

    def no_bias(model):
        n = unfuse_module.bias_gelu(model)
        for node in model.graph.node:
            if node.name.endswith("/add_bias"):
                node.op_type = "Identity"
                del node.input[1:]
        return n

    model = _with_gelu_bias(fused.path)
    monkeypatch.setitem(tune.UNFUSABLE, "BiasGelu", dataclasses.replace(tune.UNFUSABLE["BiasGelu"], unfuse=no_bias))
    assert node_error(model, "BiasGelu") > 1e-3


def test_unfuse_leaves_a_node_whose_statistics_are_read(fused):  # noqa: F811
    model = onnx.load(str(fused.path))
    node = next(n for n in model.graph.node if n.op_type == "SkipLayerNormalization")
    while len(node.output) < 2:
        node.output.append("")
    node.output[1] = "mean_read"
    model.graph.output.append(onnx.helper.make_tensor_value_info("mean_read", onnx.TensorProto.FLOAT, None))
    assert unfuse(model, "SkipLayerNormalization") == 3
    assert sum(n.op_type == "SkipLayerNormalization" for n in model.graph.node) == 1


def test_unfused_skip_rms_norm_matches_on_a_decoder(fused_llama, tmp_path):  # noqa: F811
    from slimline.generate import OnnxDecoder

    model = onnx.load(str(fused_llama.artifact.path))
    assert node_error(model, "SkipSimplifiedLayerNormalization") < 1e-5
    n = unfuse(model, "SkipSimplifiedLayerNormalization")
    assert n == sum(
        1 for x in onnx.load(str(fused_llama.artifact.path)).graph.node if x.op_type == "SkipSimplifiedLayerNormalization"
    )
    path = tmp_path / "unfused.onnx"
    onnx.save(model, str(path))
    ids = np.array([[5, 17, 42, 8, 9, 11]])
    a, b = OnnxDecoder(fused_llama.artifact.path, 1), OnnxDecoder(path, 1)
    np.testing.assert_allclose(a.prefill(ids), b.prefill(ids), atol=1e-4)
    np.testing.assert_allclose(a.step(np.array([3])), b.step(np.array([3])), atol=1e-4)


def test_tune_times_both_forms_and_keeps_the_faster_one(fused, tmp_path):  # noqa: F811
    r = Tune(batch_sizes=[1, 4], seq_len=16, repeats=3).run(fused, context(tmp_path / "a"))
    rep = r.report
    assert rep["SkipLayerNormalization.b1"].startswith("fused ") and "unfused" in rep["SkipLayerNormalization.b4"]
    ops = [n.op_type for n in onnx.load(str(r.artifact.path)).graph.node]
    if rep["SkipLayerNormalization"].startswith("unfused"):
        assert "SkipLayerNormalization" not in ops and rep["SkipLayerNormalization.node_max_error"] < 1e-5
        assert rep["SkipLayerNormalization.min_cosine"] > 0.9999
        # inspect --fusions says the nodes were left unfused on purpose, not missed
        from slimline.inspection import inspect_fusions

        assert inspect_fusions(r.artifact.path)["tuned"][0].startswith("SkipLayerNormalization: 4 nodes un-fused")
    else:
        assert ops.count("SkipLayerNormalization") == 4
    a, b = _outputs(fused.path, fused), _outputs(r.artifact.path, fused)
    for case in a:
        np.testing.assert_allclose(a[case], b[case], atol=1e-4, err_msg=case)
    # a gain nothing can show keeps the fused graph, unchanged
    kept = Tune(batch_sizes=[2], seq_len=16, repeats=3, min_gain=0.99).run(fused, context(tmp_path / "b"))
    assert kept.report["SkipLayerNormalization"].startswith("kept fused")
    assert [n.op_type for n in onnx.load(str(kept.artifact.path)).graph.node] == [
        n.op_type for n in onnx.load(str(fused.path)).graph.node
    ]


def test_tune_refuses_bad_options():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Tune(batch_sizes=[0])
    with pytest.raises(ValidationError):
        Tune(candidates=["Attention"])


def test_node_check_runs_on_an_fp16_graph(fused, tmp_path):  # noqa: F811
    """After quantize.fp16 the norms' weights and inputs are fp16 (CUDA recipes keep them so): the
    per-node check builds its graphs in that type instead of failing inside ONNX Runtime."""
    from slimline.quantize.fp16 import Fp16

    half = Fp16(keep_float=[], min_cosine=0.99).run(fused, context(tmp_path))
    model = onnx.load(str(half.artifact.path))
    types = {t.name: t.data_type for t in model.graph.initializer}
    skips = [n for n in model.graph.node if n.op_type == "SkipLayerNormalization"]
    assert skips and all(types[n.input[2]] == onnx.TensorProto.FLOAT16 for n in skips)
    assert node_error(model, "SkipLayerNormalization") < 1e-2  # fp16 rounding of the output


def test_the_tune_mark_is_kept_per_op_and_read_by_inspect(fused, tmp_path):  # noqa: F811
    from slimline.compile.tune import mark
    from slimline.inspection import inspect_fusions

    model = onnx.load(str(fused.path))
    unfuse(model, "SkipLayerNormalization")
    mark(model, "SkipLayerNormalization", 4, {1: 1.1, 32: 1.2})
    mark(model, "SkipLayerNormalization", 4, {1: 1.15, 32: 1.25})  # a second decision replaces the first
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert inspect_fusions(path)["tuned"] == [
        "SkipLayerNormalization: 4 nodes un-fused, faster on the ONNX Runtime CPU EP (1.15x at b1, 1.25x at b32)"
    ]


def test_tune_keeps_the_weight_sharing_marks_for_the_final_save(fused_llama, tmp_path):  # noqa: F811
    """A tied int4 head and embedding are marked as one set of bytes (slimline.onnxfile); the run folder's
    final save stores them once. compile.tune hands its graph on as the other stages do, marks intact."""
    from slimline import onnxfile
    from slimline.quantize.weight_only import WeightOnly

    w = WeightOnly(bits=4, block_size=16, head_bits=4, embedding_bits=4, min_cosine=0.5).run(
        fused_llama.artifact, context(tmp_path / "w")
    )
    marked = {t.name for t in onnx.load(str(w.artifact.path)).graph.initializer if onnxfile.view_of(t)}
    r = Tune(batch_sizes=[1], seq_len=8, repeats=3).run(w.artifact, context(tmp_path / "t"))
    assert marked and marked == {t.name for t in onnx.load(str(r.artifact.path)).graph.initializer if onnxfile.view_of(t)}
