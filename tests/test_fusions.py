"""Each fusion rule: a positive, a variant (commuted operands / another export style) and a negative
case, on small graphs built here, asserting op counts and ONNX Runtime output equality."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimline.compile.fusions import UnsupportedGraph, fuse_model
from slimline.runtime import ort_session

H, N, D, V, P = 16, 2, 8, 50, 40  # hidden, heads, head size, vocab, max positions


class G:
    """A tiny graph builder: constants become initializers, every node gets a module-style name."""

    def __init__(self, seed: int = 0):
        self.nodes, self.inits, self.rng, self.n = [], [], np.random.default_rng(seed), 0

    def const(self, value, name=None) -> str:
        name = name or f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def w(self, *shape, name=None) -> str:
        return self.const((self.rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    def op(self, op_type, *inputs, scope="/m", outputs=1, **attrs):
        self.n += 1
        outs = [f"{op_type}_{self.n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{scope}/{op_type}_{self.n}", **attrs))
        return outs[0] if outputs == 1 else outs

    def model(self, inputs, output) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], self.inits
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        return model


IDS = [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "S"]) for n in ("input_ids", "token_type_ids", "attention_mask")]


def embeddings(g: G, order="wtp", pos_start=0, segments=True) -> str:
    scope = "/embeddings"
    seq = g.op(
        "Unsqueeze",
        g.op("Gather", g.op("Shape", "input_ids", scope=scope), g.const(np.int64(1)), scope=scope, axis=0),
        g.const(np.array([0], np.int64)),
        scope=scope,
    )
    pos_ids = g.op(
        "Slice",
        g.const(np.arange(P, dtype=np.int64)[None], "position_ids"),
        g.const(np.array([pos_start], np.int64)),
        seq if not pos_start else g.op("Add", seq, g.const(np.array([pos_start], np.int64)), scope=scope),
        g.const(np.array([1], np.int64)),
        scope=scope,
    )
    word = g.op("Gather", g.w(V, H, name="embeddings.word_embeddings.weight"), "input_ids", scope=scope)
    pos = g.op("Gather", g.w(P, H, name="embeddings.position_embeddings.weight"), pos_ids, scope=scope)
    if segments:
        seg = g.op("Gather", g.w(2, H, name="embeddings.token_type_embeddings.weight"), "token_type_ids", scope=scope)
        total = (
            g.op("Add", g.op("Add", word, seg, scope=scope), pos, scope=scope)
            if order == "wtp"
            else g.op("Add", pos, g.op("Add", word, pos and seg, scope=scope), scope=scope)
        )
    else:
        total = g.op("Add", word, pos, scope=scope)
    return g.op("LayerNormalization", total, g.w(H), g.w(H), scope=scope, axis=-1, epsilon=1e-12)


def linear(g: G, x: str, din: int, dout: int, scope: str, bias_first=True) -> str:
    y = g.op("MatMul", x, g.w(din, dout, name=f"{scope}.weight"), scope=scope)
    b = g.w(dout, name=f"{scope}.bias")
    return g.op("Add", b, y, scope=scope) if bias_first else g.op("Add", y, b, scope=scope)


def attention(g: G, x: str, scale="qk", mask=True, extra=None, bias_first=True) -> str:
    s = "/encoder/layer.0/attention/self"
    split = g.const(np.array([0, 0, N, D], np.int64))

    def head(name, perm):
        return g.op(
            "Transpose",
            g.op("Reshape", linear(g, x, H, H, f"encoder.layer.0.attention.self.{name}", bias_first), split, scope=s),
            scope=s,
            perm=perm,
        )

    q, k, v = head("query", [0, 2, 1, 3]), head("key", [0, 2, 3, 1]), head("value", [0, 2, 1, 3])
    if scale == "qk":
        c = g.const(np.float32(D**-0.25))
        scores = g.op("MatMul", g.op("Mul", q, c, scope=s), g.op("Mul", k, c, scope=s), scope=s)
    else:
        scores = g.op("Div", g.op("MatMul", q, k, scope=s), g.const(np.float32(D**0.5)), scope=s)
    if mask:
        m = g.op(
            "Cast",
            g.op("Unsqueeze", "attention_mask", g.const(np.array([1, 2], np.int64)), scope=s),
            scope=s,
            to=TensorProto.FLOAT,
        )
        additive = g.op("Mul", g.op("Sub", g.const(np.float32(1.0)), m, scope=s), g.const(np.float32(-10000.0)), scope=s)
        scores = g.op("Add", scores, additive, scope=s)
    probs = g.op("Softmax", scores, scope=s, axis=-1)
    if extra:
        probs = g.op(extra, probs, scope=s)  # an op a rewrite can't see through
    ctx = g.op("Transpose", g.op("MatMul", probs, v, scope=s), scope=s, perm=[0, 2, 1, 3])
    return g.op("Reshape", ctx, g.const(np.array([0, 0, H], np.int64)), scope=s)


def skip_ln(g: G, x: str, residual: str, scope: str, bias_first=True) -> str:
    y = linear(g, x, x_dim(x), H, f"{scope}.dense", bias_first)
    return g.op(
        "LayerNormalization",
        g.op("Add", y, residual, scope=scope),
        g.w(H, name=f"{scope}.LayerNorm.weight"),
        g.w(H, name=f"{scope}.LayerNorm.bias"),
        scope=scope,
        axis=-1,
        epsilon=1e-12,
    )


_DIMS: dict[str, int] = {}


def x_dim(x: str) -> int:
    return _DIMS.get(x, H)


def gelu(g: G, x: str, sqrt2=2**0.5) -> str:
    s = "/encoder/layer.0/intermediate"
    erf = g.op("Erf", g.op("Div", x, g.const(np.float32(sqrt2)), scope=s), scope=s)
    return g.op(
        "Mul", g.op("Mul", x, g.op("Add", erf, g.const(np.float32(1.0)), scope=s), scope=s), g.const(np.float32(0.5)), scope=s
    )


def bert(order="wtp", pos_start=0, scale="qk", extra=None, bias_first=True, sqrt2=2**0.5, mask=True) -> onnx.ModelProto:
    g = G()
    x = embeddings(g, order, pos_start)
    a = skip_ln(g, attention(g, x, scale, mask, extra, bias_first), x, "encoder.layer.0.attention.output", bias_first)
    inter = gelu(g, linear(g, a, H, 4 * H, "encoder.layer.0.intermediate.dense", bias_first), sqrt2)
    _DIMS[inter] = 4 * H
    out = skip_ln(g, inter, a, "encoder.layer.0.output", bias_first)
    return g.model(IDS, out)


def fuse(proto: onnx.ModelProto, tmp_path, **kw):
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, src)
    model = ir.load(str(src))
    result = fuse_model(model, **kw)
    ir.save(model, str(dst))
    return result, src, dst


def max_error(src, dst) -> float:
    a, b = ort_session(src, 1), ort_session(dst, 1)
    rng, worst = np.random.default_rng(1), 0.0
    for batch, seq, pad in ((1, 5, 0), (3, 12, 4)):
        ids = rng.integers(0, V, (batch, seq))
        mask = np.ones_like(ids)
        mask[-1, seq - pad :] = 0 if pad else 1
        feeds = {"input_ids": ids, "token_type_ids": rng.integers(0, 2, (batch, seq)), "attention_mask": mask}
        names = {i.name for i in a.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        diff = np.abs(a.run(None, feeds)[0] - b.run(None, feeds)[0]) * mask[..., None]
        worst = max(worst, float(diff.max()))
    return worst


FULL = {"EmbedLayerNormalization": 1, "Attention": 1, "SkipLayerNormalization": 2, "BiasGelu": 1}


@pytest.mark.parametrize(
    "variant",
    [
        {},  # the legacy exporter's shape: bias first, sqrt(scale) on Q and K, (word + type) + pos
        {"bias_first": False, "order": "wpt", "scale": "div"},  # commuted Adds, other sum order, scores / sqrt(d)
        {"mask": False},
    ],
    ids=["legacy-export", "commuted-and-div-scale", "no-mask"],
)
def test_encoder_rules_fuse_every_op_and_keep_outputs(variant, tmp_path):
    result, src, dst = fuse(bert(**variant), tmp_path)
    assert result.counts == FULL, result.unfused
    assert result.unfused == []
    assert max_error(src, dst) < 1e-5
    kinds = {n.op_type for n in onnx.load(dst).graph.node}
    assert kinds <= {"Cast", "MatMul", *FULL}  # nothing of the original blocks is left


def test_attention_uses_mask_index_not_a_float_bias(tmp_path):
    _, _, dst = fuse(bert(), tmp_path)
    (node,) = [n for n in onnx.load(dst).graph.node if n.op_type == "Attention"]
    assert len(node.input) == 4 and node.input[3]  # mask_index (int32 attention_mask), as QAttention expects
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["num_heads"] == N


def test_attention_negative_names_the_layer_and_reason(tmp_path):
    result, src, dst = fuse(bert(extra="Relu"), tmp_path)  # an extra op between Softmax and the V MatMul
    assert "Attention" not in result.counts
    assert result.counts["SkipLayerNormalization"] == 2 and result.counts["EmbedLayerNormalization"] == 1
    (miss,) = result.unfused_for("Attention")
    assert miss["where"] == "encoder.layer.0.attention.self" and miss["rule"].startswith("bert_self_attention")
    assert miss["reason"]
    assert max_error(src, dst) < 1e-5


def test_identity_inside_attention_is_optimized_away_and_still_fuses(tmp_path):
    result, *_ = fuse(bert(extra="Identity"), tmp_path)
    assert result.counts["Attention"] == 1


def test_embed_negative_offset_positions(tmp_path):
    result, src, dst = fuse(bert(pos_start=2), tmp_path)  # RoBERTa-style positions do not start at 0
    assert "EmbedLayerNormalization" not in result.counts and result.counts["Attention"] == 1
    (miss,) = result.unfused_for("EmbedLayerNormalization")
    assert "position" in miss["reason"] and "start at 2" in miss["reason"]
    assert max_error(src, dst) < 1e-5


def test_gelu_negative_wrong_constant(tmp_path):
    result, src, dst = fuse(bert(sqrt2=1.5), tmp_path)  # x * (1 + erf(x / 1.5)) / 2 is not GELU
    assert "BiasGelu" not in result.counts and "Gelu" not in result.counts
    assert result.unfused_for("BiasGelu")
    assert max_error(src, dst) < 1e-5


def test_skip_layer_norm_negative_constant_residual(tmp_path):
    g = G()
    x = embeddings(g)
    y = g.op("LayerNormalization", g.op("Add", linear(g, x, H, H, "dense"), g.w(H)), g.w(H), g.w(H), axis=-1)
    result, src, dst = fuse(g.model(IDS, y), tmp_path)
    assert "SkipLayerNormalization" not in result.counts  # a bias, not a residual: nothing to skip
    assert max_error(src, dst) < 1e-5


def test_skip_option_leaves_that_op_alone(tmp_path):
    result, src, dst = fuse(bert(), tmp_path, skip=("Attention",))
    assert "Attention" not in result.counts and result.counts["SkipLayerNormalization"] == 2
    assert max_error(src, dst) < 1e-5


def rms_graph(cast=False, axis=-1, with_residual=False) -> onnx.ModelProto:
    g = G()
    x = "x"
    if with_residual:
        x = g.op("Add", "x", "r")
    h = g.op("Cast", x, to=TensorProto.FLOAT) if cast else x
    var = g.op(
        "ReduceMean",
        g.op("Pow", h, g.const(np.float32(2.0))),
        g.const(np.array([axis], np.int64)),
        keepdims=1,
        noop_with_empty_axes=0,
    )
    normed = g.op("Mul", h, g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(np.float32(1e-6))))))
    y = g.op("Mul", g.w(H, name="model.layers.0.input_layernorm.weight"), normed)
    if with_residual:
        y = g.op("Add", g.op("MatMul", y, g.w(H, H)), x)
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", H]) for n in (["x", "r"] if with_residual else ["x"])
    ]
    return g.model(inputs, y)


def run_float(src, dst, names) -> float:
    a, b = ort_session(src, 1), ort_session(dst, 1)
    feeds = {n: np.random.default_rng(2).standard_normal((2, 5, H)).astype(np.float32) for n in names}
    return float(np.abs(a.run(None, feeds)[0] - b.run(None, feeds)[0]).max())


@pytest.mark.parametrize("cast", [False, True], ids=["plain", "with-casts"])
def test_rms_norm_positive_and_variant(cast, tmp_path):
    result, src, dst = fuse(rms_graph(cast=cast), tmp_path)
    assert result.counts == {"SimplifiedLayerNormalization": 1}
    assert run_float(src, dst, ["x"]) < 1e-5


def test_rms_norm_negative_wrong_axis(tmp_path):
    result, src, dst = fuse(rms_graph(axis=1), tmp_path)  # mean over the sequence, not the hidden axis
    assert "SimplifiedLayerNormalization" not in result.counts
    assert run_float(src, dst, ["x"]) < 1e-5


def test_skip_rms_norm_fuses_the_residual_add(tmp_path):
    result, src, dst = fuse(rms_graph(with_residual=True), tmp_path)
    assert result.counts == {"SkipSimplifiedLayerNormalization": 1}
    assert run_float(src, dst, ["x", "r"]) < 1e-5


def test_old_opset_is_refused_with_the_fix(tmp_path):
    proto = bert()
    proto.opset_import[0].version = 13
    with pytest.raises(UnsupportedGraph, match="opset 13.*opset: 18"):
        fuse(proto, tmp_path)


def test_unknown_op_is_left_alone_and_the_rest_fuses(tmp_path):
    g = G()
    x = embeddings(g)
    odd = g.op("MysteryOp", x, scope="/custom")
    g.nodes[-1].domain = "com.example"
    proto = g.model(IDS, odd)
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    result, _, dst = fuse(proto, tmp_path)
    assert result.counts == {"EmbedLayerNormalization": 1}
    assert "MysteryOp" in {n.op_type for n in onnx.load(dst).graph.node}


@pytest.mark.parametrize(
    ("start", "end", "folds"),
    [(-1, 2**63 - 1, True), (2, 3, True), (0, 1, False)],
    ids=["last-dim", "middle-dim", "dynamic-batch"],
)
def test_static_shape_slice_folds_only_static_dims(start, end, folds, tmp_path):
    from onnxscript.rewriter import RewriteRuleSet

    from slimline.compile.fusions import static_shape

    g = G()
    dims = g.op("Slice", g.op("Shape", "x"), g.const(np.array([start], np.int64)), g.const(np.array([end], np.int64)))
    y = g.op("Reshape", "x", g.op("Concat", g.const(np.array([-1], np.int64)), dims, axis=0))
    proto = g.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, H])], y)
    onnx.save(proto, tmp_path / "in.onnx")
    model = ir.load(str(tmp_path / "in.onnx"))
    import onnx_ir.passes.common as common_passes

    common_passes.ShapeInferencePass()(model)
    assert RewriteRuleSet(static_shape.rules()).apply_to_model(model) == (1 if folds else 0)
    assert ("Shape" in {n.op_type for n in model.graph}) != folds
    ir.save(model, str(tmp_path / "out.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 3, H)).astype(np.float32)
    a, b = ort_session(tmp_path / "in.onnx", 1), ort_session(tmp_path / "out.onnx", 1)
    np.testing.assert_array_equal(a.run(None, {"x": x})[0], b.run(None, {"x": x})[0])


# -- QuickGelu: the worked example of adding a fused op (docs/compile.md) ------------------------------------


def quick_gelu_graph(alpha=1.702, commuted=False, alpha_input=False) -> onnx.ModelProto:
    g = G()
    h = g.op("MatMul", "x", g.w(H, H), scope="/text_model/encoder/layers.0/mlp/fc1")
    a = "alpha" if alpha_input else g.const(np.float32(alpha))
    act = "/text_model/encoder/layers.0/mlp/activation_fn"
    scaled = g.op("Mul", a, h, scope=act) if commuted else g.op("Mul", h, a, scope=act)
    gate = g.op("Sigmoid", scaled, scope=act)
    y = g.op("Mul", gate, h, scope=act) if commuted else g.op("Mul", h, gate, scope=act)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", H])]
    if alpha_input:
        inputs.append(helper.make_tensor_value_info("alpha", TensorProto.FLOAT, []))
    return g.model(inputs, y)


@pytest.mark.parametrize("commuted", [False, True], ids=["as-exported", "commuted"])
def test_quick_gelu_fuses_and_keeps_outputs(commuted, tmp_path):
    result, src, dst = fuse(quick_gelu_graph(commuted=commuted), tmp_path)
    assert result.counts == {"QuickGelu": 1} and result.unfused == []
    assert run_float(src, dst, ["x"]) < 1e-5  # measured 2.4e-7
    (node,) = [n for n in onnx.load(dst).graph.node if n.op_type == "QuickGelu"]
    assert node.domain == "com.microsoft" and abs(helper.get_attribute_value(node.attribute[0]) - 1.702) < 1e-6


def test_quick_gelu_negative_silu_is_not_a_candidate(tmp_path):
    """x * sigmoid(x * 1) is SiLU (the optimizer drops the * 1): not fused, and not listed as a missed fusion."""
    result, src, dst = fuse(quick_gelu_graph(alpha=1.0), tmp_path)
    assert "QuickGelu" not in result.counts and result.unfused_for("QuickGelu") == []
    assert run_float(src, dst, ["x"]) < 1e-6


def test_quick_gelu_negative_per_channel_alpha_names_the_layer_and_reason(tmp_path):
    result, src, dst = fuse(quick_gelu_graph(alpha=np.full(H, 1.702, np.float32)), tmp_path)
    assert "QuickGelu" not in result.counts
    (left,) = result.unfused_for("QuickGelu")
    assert f"alpha has {H} values, not one" in left["reason"] and "layers.0" in left["where"]
    assert run_float(src, dst, ["x"]) < 1e-6


def test_quick_gelu_negative_alpha_not_constant(tmp_path):
    result, _, _ = fuse(quick_gelu_graph(alpha_input=True), tmp_path)
    assert "QuickGelu" not in result.counts


def test_quick_gelu_can_be_skipped(tmp_path):
    result, _, _ = fuse(quick_gelu_graph(), tmp_path, skip=("QuickGelu",))
    assert "QuickGelu" not in result.counts
