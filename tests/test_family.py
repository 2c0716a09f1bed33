"""The model-family adapter: contracts computed from a model's config (compile.fuse: {expect: auto}) hold
on every family the rules cover, and the generic recipes take any model by --model."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from slimline.cli import main
from slimline.compile.export import Export
from slimline.compile.fuse import Fuse
from slimline.family import expected_fusions, family_of
from slimline.models import load_model
from tests.models import bert_family
from tests.test_compile import context


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "electra", "mpnet", "deberta-v2"])
def test_expect_auto_is_met_on_every_encoder_family(kind, tiny_bert_dir, tmp_path):
    folder = tiny_bert_dir if kind == "bert" else bert_family(kind, tiny_bert_dir, tmp_path / kind, layers=3)
    model = load_model(str(folder))
    ctx = context(tmp_path)
    contract, how = expected_fusions(family_of("feature-extraction"), model.config)
    layers = 2 if kind == "bert" else 3
    relative = kind == "deberta-v2"  # disentangled attention: no fused kernel, the contract says so
    skips = 2 * layers + (kind in ("roberta", "mpnet"))  # offset positions: the embedding sum is one more skip LayerNorm
    assert contract.get("Attention") == (None if relative else layers) and contract["SkipLayerNormalization"] == skips, how
    assert ("EmbedLayerNormalization" in contract) == (kind not in ("roberta", "mpnet", "deberta-v2"))
    r = Fuse(expect="auto").run(Export().run(model, ctx).artifact, ctx).report
    assert r["contract"] == "met" and r["parity.max_abs_error"] < 1e-4, r
    for op, count in contract.items():
        assert r[f"fused.{op}"] == count, (op, r)
    assert r["contract.auto"] == how
    if relative:
        assert "no fused ONNX Runtime kernel" in how and not r.get("fused.Attention")


def test_expect_auto_on_a_llama_decoder(tmp_path):
    from tests.models import tiny_llama

    model = load_model(str(tiny_llama(tmp_path / "llama")), "text-generation")
    ctx = context(tmp_path)
    r = Fuse(expect="auto").run(Export().run(model, ctx).artifact, ctx).report
    assert r["contract"] == "met", r
    assert r["contract.expected"] == "GroupQueryAttention 2, SkipSimplifiedLayerNormalization 4, SimplifiedLayerNormalization 1"


def test_expect_auto_without_a_known_contract_warns_and_checks_nothing():
    from transformers import FunnelConfig

    contract, how = expected_fusions(family_of("feature-extraction"), FunnelConfig())
    assert contract == {} and "funnel" in how


def test_expect_auto_leaves_skipped_ops_out(tiny_bert_dir, tmp_path):
    model = load_model(str(tiny_bert_dir))
    ctx = context(tmp_path)
    r = Fuse(expect="auto", skip=["Attention"]).run(Export().run(model, ctx).artifact, ctx).report
    assert r["contract"] == "met" and "Attention" not in r["contract.expected"]


def test_generic_recipe_takes_the_model_from_the_command_line(tiny_bert_dir):
    result = CliRunner().invoke(
        main, ["validate", "encoder-int8", "--model", str(tiny_bert_dir), "--task", "text-classification"]
    )
    assert result.exit_code == 0, result.output
    assert f"source: {tiny_bert_dir}" in result.output and "task: text-classification" in result.output
    bad = CliRunner().invoke(main, ["validate", "encoder-int8", "--task", "summarization"])
    assert bad.exit_code == 2 and "summarization" in bad.output


# -- describing a model without loading it, and refusing before anything loads -----------------------------


def test_inspect_a_model_folder_loads_no_weights(tiny_bert_dir, tmp_path, monkeypatch):
    import transformers

    def no_loading(*a, **k):
        raise AssertionError("inspect MODEL must not load weights")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_loading)
    result = CliRunner().invoke(main, ["inspect", str(tiny_bert_dir), "--json"])
    assert result.exit_code == 0, result.output
    import json

    m = json.loads(result.output)["model"]
    assert m["model_type"] == "bert" and m["family"] == "encoder" and m["supported"] and m["unsupported"] == []
    assert m["layers"] == 2 and m["parameters"] > 10_000 and m["fusions"]["expected"]["Attention"] == 2


def test_a_task_without_its_head_is_refused_before_loading(tiny_bert_dir, tmp_path):
    """A base encoder run as a classifier would get a random head from transformers: refused, with the fix."""
    import yaml

    from tests.models import tiny_recipe

    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False})
    data["model"]["task"] = "text-classification"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "has no such head" in result.output and "BertModel" in result.output
    assert not (tmp_path / "run").exists()


def test_an_unsupported_decoder_is_refused_before_loading(tiny_bert_dir, tmp_path):
    import json

    import yaml

    folder = tmp_path / "gemma-like"
    shutil.copytree(tiny_bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update({"model_type": "mamba", "architectures": ["MambaForCausalLM"]})
    (folder / "config.json").write_text(json.dumps(config))
    recipe = {"name": "d", "model": {"source": str(folder), "task": "text-generation"}, "stages": [{"compile.export": {}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "mamba" in result.output and "compile.export" in result.output, result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "Gemma 3 multimodal"),
        ({"vocab_size": 50}, "embedding table has 50 rows"),
    ],
)
def test_a_multimodal_gemma_or_a_tokenizer_past_the_embeddings_is_refused_before_loading(change, says, tiny_bert_dir, tmp_path):
    import json

    import yaml

    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **change})
    (folder / "config.json").write_text(json.dumps(config))
    recipe = {"name": "d", "model": {"source": str(folder), "task": "text-generation"}, "stages": [{"compile.export": {}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output


def test_missing_tokenizer_is_refused_before_loading(tiny_bert_dir, tmp_path):
    import yaml

    from tests.models import tiny_recipe

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_bert_dir, folder)
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(folder, speed={"enabled": False})))
    result = CliRunner().invoke(main, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no tokenizer files" in result.output


@pytest.mark.parametrize(
    ("kind", "role", "expected"),
    [
        ("bert", "role:ffn.out@0", ["/encoder/layer.0/output/dense/MatMul"]),
        ("bert", "role:ffn.out@-1", ["/encoder/layer.1/output/dense/MatMul"]),
        (
            "bert",
            "role:attention.out",
            ["/encoder/layer.0/attention/output/dense/MatMul", "/encoder/layer.1/attention/output/dense/MatMul"],
        ),
        ("distilbert", "role:ffn.out@0", ["/transformer/layer.0/ffn/lin2/MatMul"]),
        ("distilbert", "role:ffn.in@1", ["/transformer/layer.1/ffn/lin1/MatMul"]),
    ],
)
def test_layers_are_chosen_by_role_in_every_encoder_family(kind, role, expected, tiny_bert_dir, tmp_path):
    import onnx

    from slimline.quantize.common import matching_nodes

    folder = tiny_bert_dir if kind == "bert" else bert_family(kind, tiny_bert_dir, tmp_path / kind)
    ctx = context(tmp_path)
    exported = Export().run(load_model(str(folder)), ctx)
    graph = onnx.load(str(exported.artifact.path))
    assert sorted(matching_nodes(graph, [role], ctx, "quantize.dynamic_int8")) == expected


def test_layers_by_role_on_a_decoder_read_the_exporters_scopes(tmp_path):
    import onnx

    from slimline.quantize.common import matching_nodes, module_path
    from tests.models import tiny_llama

    ctx = context(tmp_path)
    exported = Export().run(load_model(str(tiny_llama(tmp_path / "llama")), "text-generation"), ctx)
    graph = onnx.load(str(exported.artifact.path))
    chosen = matching_nodes(graph, ["role:ffn.out@1"], ctx, "quantize.weight_only")
    paths = {n.name: module_path(n) for n in graph.graph.node}
    assert [paths[n] for n in chosen] == ["model.model.layers.1.mlp.down_proj"]  # the export wrapper adds `model.`


def test_an_unknown_role_is_refused_when_the_recipe_loads():
    from pydantic import ValidationError

    from slimline.quantize.dynamic import DynamicInt8

    with pytest.raises(ValidationError, match="ffn.out"):
        DynamicInt8(exclude=["role:ffn.outt@0"])


def test_mpnet_position_bias_reaches_attention_and_int8_keeps_it(tiny_bert_dir, tmp_path):
    """MPNet adds a relative-position bias to every layer's scores: the fused Attention takes it as
    attention_bias, and dynamic int8 keeps those Attention nodes in float, since ONNX Runtime's
    quantizer turns Attention into QAttention, which has no such input and would drop it silently."""
    import onnx
    import torch

    from slimline.measure.parity import compare
    from slimline.quantize.dynamic import DynamicInt8
    from slimline.runtime import ort_function

    folder = bert_family("mpnet", tiny_bert_dir, tmp_path / "mpnet")
    model = load_model(str(folder))
    with torch.no_grad():  # a bias large enough to move the softmax, so dropping it shows
        model.model.encoder.relative_attention_bias.weight.mul_(100)
    ctx = context(tmp_path)
    exported = Export().run(model, ctx)
    fused = Fuse(expect="auto").run(exported.artifact, ctx)
    assert fused.report["contract"] == "met" and fused.report["parity.max_abs_error"] < 1e-4
    proto = onnx.load(str(fused.artifact.path))
    attention = [n for n in proto.graph.node if n.op_type == "Attention"]
    assert len(attention) == 2 and all(len(n.input) == 6 and n.input[5] for n in attention)

    for node in attention:  # without the bias the outputs move: the parity check has teeth here
        del node.input[3:]
    onnx.save(proto, str(tmp_path / "no-bias.onnx"))
    run_fused, names = ort_function(fused.artifact.path, 1)
    run_broken, _ = ort_function(tmp_path / "no-bias.onnx", 1)
    encoded = model.tokenizer(["the king is dead long live the king"], return_tensors="np")
    feeds = {"one sentence": {k: v.astype("int64") for k, v in encoded.items() if k in names}}
    assert compare(run_fused, run_broken, feeds).max_abs_error > 1e-2

    report = DynamicInt8().run(fused.artifact, ctx).report
    assert report["float.Attention"] == 2 and "quantized.QAttention" not in report
