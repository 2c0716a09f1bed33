"""Export parity, fusion counts and contracts, on a 2-layer BERT built in the test."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from slimline.compile.export import Export
from slimline.compile.fuse import Fuse
from slimline.errors import StageError
from slimline.measure.data import TextData
from slimline.measure.inputs import sample_feeds
from slimline.measure.parity import compare
from slimline.models import load_model
from slimline.runtime import ort_function
from slimline.stage import Context

TEXTS = ["Now is the winter of our discontent", "Good night, sweet prince", "to be or not to be that is the question"]


def context(tmp_path):
    data = TextData("test", calibration=TEXTS * 4, evaluation=TEXTS)
    return Context(workdir=tmp_path, threads=1, load_data=lambda: data)


@pytest.fixture(scope="module")
def exported(tiny_bert_dir, tmp_path_factory):
    model = load_model(str(tiny_bert_dir))
    ctx = context(tmp_path_factory.mktemp("export"))
    result = Export().run(model, ctx)
    return model, result


def test_export_matches_torch_with_dynamic_axes(exported):
    _, result = exported
    assert result.report["parity.max_abs_error"] < 1e-4  # measured ~1e-6
    assert result.report["parity.cases"] == 4  # three random shapes with padding, one of real text
    graph = onnx.load(str(result.artifact.path))
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert all(d[0] and d[1] for d in dims.values()), dims  # batch and sequence are symbolic


def test_export_fails_above_tolerance(tiny_bert_dir, tmp_path):
    model = load_model(str(tiny_bert_dir))
    with pytest.raises(StageError, match="differs from torch"):
        Export(atol=1e-12).run(model, context(tmp_path))


def test_fuse_counts_and_parity(exported, tmp_path):
    _, exp = exported
    result = Fuse(expect={"Attention": 2, "SkipLayerNormalization": 4, "EmbedLayerNormalization": 1}).run(
        exp.artifact, context(tmp_path)
    )
    r = result.report
    assert r["fused.Attention"] == 2 and r["fused.SkipLayerNormalization"] == 4 and r["fused.EmbedLayerNormalization"] == 1
    assert r["contract"] == "met"
    assert r["nodes_after"] < r["nodes_before"] / 3
    # parity is checked inside the stage; check it again independently, on other inputs
    run_a, names = ort_function(exp.artifact.path)
    run_b, _ = ort_function(result.artifact.path)
    res = compare(run_a, run_b, sample_feeds(exp.artifact.tokenizer, names, ["a fair night of love"], seed=7))
    assert res.max_abs_error < 1e-4  # measured ~2e-6


def test_fuse_skip_leaves_attention_unfused_and_the_rest_fused(exported, tmp_path):
    _, exp = exported
    r = Fuse(skip=["Attention"], expect={"SkipLayerNormalization": 4}).run(exp.artifact, context(tmp_path)).report
    assert "fused.Attention" not in r and r["fused.SkipLayerNormalization"] == 4
    assert r["unfused.MatMul"] == 2 * (3 + 2 + 3)  # per layer: Q, K, V, 2 attention-score, out, FFN in/out
    assert r["parity.max_abs_error"] < 1e-4


def test_fuse_contract_shortfall_fails_with_counts(exported, tmp_path):
    _, exp = exported
    with pytest.raises(StageError, match=r"Attention: expected 3, got 2"):
        Fuse(expect={"Attention": 3}).run(exp.artifact, context(tmp_path))


def test_fuse_contract_allow_partial_warns(exported, tmp_path):
    _, exp = exported
    ctx = context(tmp_path)
    result = Fuse(expect={"Attention": 3}, allow_partial=True).run(exp.artifact, ctx)
    assert result.report["contract"] == "partial"
    assert any("Attention: expected 3, got 2" in w for w in ctx.reporter.warnings)


def test_ort_engine_refuses_unknown_model_type(exported, tmp_path):
    _, exp = exported
    import copy

    art = copy.copy(exp.artifact)
    art.config = copy.deepcopy(exp.artifact.config)
    art.config.model_type = "llama"
    with pytest.raises(StageError, match="has no rules for model_type `llama`"):
        Fuse(engine="ort").run(art, context(tmp_path))
    # slimline's engine matches graph patterns, not model types: the same graph fuses
    assert Fuse().run(art, context(tmp_path)).report["fused.Attention"] == 2


def test_compare_masks_padding_and_flags_shape_mismatch():
    mask = np.array([[1, 1, 0]])
    a = {"y": np.zeros((1, 3, 2))}
    b = {"y": np.array([[[0, 0], [0, 0], [9, 9]]], dtype=float)}
    assert compare(lambda f: a, lambda f: b, {"c": {"attention_mask": mask}}).max_abs_error == 0
    b2 = {"y": np.zeros((1, 4, 2))}
    assert compare(lambda f: a, lambda f: b2, {"c": {"attention_mask": mask}}).max_abs_error == float("inf")


def with_graph(artifact, graph, folder):
    """A copy of ``artifact`` whose ONNX file is ``graph``, saved in ``folder``."""
    import copy

    folder.mkdir()
    onnx.save(graph, str(folder / "model.onnx"))
    changed = copy.copy(artifact)
    changed.path = folder / "model.onnx"
    return changed


def insert_after(graph, node, op_type: str = "Relu") -> None:
    """Put a ``op_type`` node between ``node`` and every reader of its first output (in place)."""
    from onnx import helper

    out, new = node.output[0], f"{node.output[0]}_broken"
    for reader in graph.graph.node:
        reader.input[:] = [new if i == out else i for i in reader.input]
    index = list(graph.graph.node).index(node)
    graph.graph.node.insert(index + 1, helper.make_node(op_type, [out], [new], name=f"/broken/{op_type}"))


def _broken_copy(artifact, tmp_path, layer: int):
    """The exported graph with an extra Relu between layer ``layer``'s attention Softmax and its V MatMul."""
    graph = onnx.load(str(artifact.path))
    insert_after(graph, next(n for n in graph.graph.node if n.op_type == "Softmax" and f"layer.{layer}/" in n.name))
    return with_graph(artifact, graph, tmp_path / "broken")


def test_broken_attention_block_fails_the_contract_naming_layer_and_reason(exported, tmp_path):
    _, exp = exported
    broken = _broken_copy(exp.artifact, tmp_path, layer=1)
    with pytest.raises(StageError) as err:
        Fuse(expect={"Attention": 2}).run(broken, context(tmp_path))
    message = str(err.value)
    assert "Attention: expected 2, got 1" in message
    assert "Attention at encoder.layer.1.attention.self" in message  # the layer, from the node's module path
    assert "bert_self_attention" in message  # the closest rule, and its reason after it
    assert "encoder.layer.0" not in message  # the layer that fused is not blamed


def test_allow_partial_counts_the_unfused_layer(exported, tmp_path):
    _, exp = exported
    broken = _broken_copy(exp.artifact, tmp_path, layer=0)
    ctx = context(tmp_path)
    r = Fuse(expect={"Attention": 2}, allow_partial=True).run(broken, ctx).report
    assert r["contract"] == "partial" and r["unfused.Attention"] == 1 and r["fused.Attention"] == 1
    assert any(k.startswith("unfused_at.Attention.encoder.layer.0") for k in r)
    assert r["parity.max_abs_error"] < 1e-4  # the partly fused graph is still right


def test_inspect_fusions_lists_matches_and_reasons(exported, tmp_path):
    from slimline.inspection import inspect_fusions

    _, exp = exported
    info = inspect_fusions(_broken_copy(exp.artifact, tmp_path, layer=1).path)
    assert info["fused_after_rules"]["Attention"] == 1 and info["already_fused"] == {}
    assert {m["op"] for m in info["matched"]} >= {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"}
    (miss,) = [u for u in info["unfused"] if u["op"] == "Attention"]
    assert miss["where"] == "encoder.layer.1.attention.self" and miss["reason"]


def test_fuse_refuses_old_opset_with_the_fix(exported, tmp_path):

    _, exp = exported
    graph = onnx.load(str(exp.artifact.path))
    graph.opset_import[0].version = 13
    old = with_graph(exp.artifact, graph, tmp_path / "old")
    with pytest.raises(StageError, match=r"opset 13.*compile.export: \{opset: 18\}"):
        Fuse().run(old, context(tmp_path))


def test_dynamo_exported_encoder_fuses_the_same_ops(tiny_bert_dir, tmp_path):
    model = load_model(str(tiny_bert_dir))
    ctx = context(tmp_path)
    exp = Export(exporter="dynamo").run(model, ctx)
    assert exp.report["parity.max_abs_error"] < 1e-4
    r = (
        Fuse(expect={"Attention": 2, "SkipLayerNormalization": 4, "EmbedLayerNormalization": 1, "BiasGelu": 2})
        .run(exp.artifact, ctx)
        .report
    )
    assert r["contract"] == "met" and r["parity.max_abs_error"] < 1e-4
    graph = onnx.load(str(ctx.stage_dir("fuse") / "model.onnx"))
    attention = [n for n in graph.graph.node if n.op_type == "Attention"]
    assert all(len(n.input) == 4 for n in attention)  # the 2-D mask_index, not a float attention_bias
    assert not [n for n in graph.graph.node if n.op_type == "Concat"]  # the packed QKV weights are folded


@pytest.mark.parametrize("family", ["distilbert", "roberta", "electra"])
def test_bert_family_exports_fuse_or_say_why(family, tiny_bert_dir, tmp_path):
    """Other BERT-family models, as optimum-onnx exports them: DistilBERT (no token types, its
    embeddings' shape read twice), RoBERTa (positions offset by padding_idx + 1: EmbedLayerNorm
    must refuse, and say so) and ELECTRA (eager attention: the context's shape read with Shape())."""
    from tests.models import bert_family

    folder = bert_family(family, tiny_bert_dir, tmp_path / family)
    ctx = context(tmp_path)
    exp = Export().run(load_model(str(folder)), ctx)
    r = Fuse(expect={"Attention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2}).run(exp.artifact, ctx).report
    assert r["contract"] == "met" and r["parity.max_abs_error"] < 1e-4
    if family == "roberta":
        assert "fused.EmbedLayerNormalization" not in r
        (reason,) = [v for k, v in r.items() if k.startswith("unfused_at.EmbedLayerNormalization")]
        assert "position ids" in reason
    else:
        assert r["fused.EmbedLayerNormalization"] == 1
        graph = onnx.load(str(ctx.stage_dir("fuse") / "model.onnx"))
        assert not [n for n in graph.graph.node if n.op_type in ("Gather", "Softmax")]  # nothing left computed twice
