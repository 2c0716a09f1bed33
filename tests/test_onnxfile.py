"""slimline.onnxfile: external weights with views and duplicates stored once, read back by ORT."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimline import onnxfile
from slimline.runtime import ort_function


def _model(stale: bool = False):
    """y = x @ A + x @ A_copy + x @ B_top, where B_top is the first rows-block of the wider table B."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 32)).astype(np.float32)
    b = rng.standard_normal((64, 64)).astype(np.float32)
    top = np.ascontiguousarray(b.reshape(-1)[: 64 * 32].reshape(64, 32))  # a byte range of b
    inits = [
        numpy_helper.from_array(a, "A"),
        numpy_helper.from_array(a.copy(), "A_copy"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(top + (1.0 if stale else 0.0), "B_top"),
    ]
    onnxfile.mark_view(inits[3], "B", 0)
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["p"]),
        helper.make_node("MatMul", ["x", "A_copy"], ["q"]),
        helper.make_node("MatMul", ["x", "B_top"], ["r"]),
        helper.make_node("MatMul", ["x", "B"], ["s"]),
        helper.make_node("Sum", ["p", "q", "r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 64]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _outputs(path):
    run, _ = ort_function(path, 1)
    return run({"x": np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)})


def test_views_and_duplicates_are_stored_once_and_read_back_exactly(tmp_path):
    (tmp_path / "inline").mkdir()
    (tmp_path / "external").mkdir()
    onnxfile.save(_model(), tmp_path / "inline" / "model.onnx", external=False)
    stats = onnxfile.save(_model(), tmp_path / "external" / "model.onnx", external=True)
    a_bytes, b_bytes = 64 * 32 * 4, 64 * 64 * 4
    assert stats == {"written": a_bytes + b_bytes, "shared": 2 * a_bytes}  # A_copy and B_top point at A and B
    data = (tmp_path / "external" / "model.onnx.data").stat().st_size
    assert data < a_bytes + b_bytes + onnxfile.ALIGN  # one copy each, plus alignment padding
    saved = onnx.load(str(tmp_path / "external" / "model.onnx"), load_external_data=False)
    assert all(not t.doc_string for t in saved.graph.initializer)  # marks are not shipped
    offsets = {t.name: int(next(e.value for e in t.external_data if e.key == "offset")) for t in saved.graph.initializer}
    assert offsets["B"] % onnxfile.ALIGN == 0 and offsets["B_top"] == offsets["B"] and offsets["A_copy"] == offsets["A"]
    inline, external = _outputs(tmp_path / "inline" / "model.onnx"), _outputs(tmp_path / "external" / "model.onnx")
    for k in ("y", "s"):
        np.testing.assert_array_equal(inline[k], external[k])


def test_a_view_whose_bytes_differ_is_written_whole(tmp_path):
    stats = onnxfile.save(_model(stale=True), tmp_path / "model.onnx", external=True)
    assert stats["shared"] == 64 * 32 * 4  # only the exact duplicate A_copy
    (tmp_path / "inline").mkdir()
    onnxfile.save(_model(stale=True), tmp_path / "inline" / "model.onnx", external=False)
    np.testing.assert_array_equal(_outputs(tmp_path / "model.onnx")["y"], _outputs(tmp_path / "inline" / "model.onnx")["y"])
