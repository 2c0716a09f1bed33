"""Decoder families beyond Llama (issue 22): tiny random Qwen3, Phi-3, Gemma 2, Gemma 3 and GPT-2
export with their KV cache, fuse to the contract their config gives, and keep parity; Gemma's scale,
sliding window and soft-cap reach GroupQueryAttention, and dropping them is caught."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from slimline.compile.export import Export
from slimline.compile.export_llm import onnx_stepper
from slimline.compile.fuse import Fuse
from slimline.family import expected_fusions, family_of
from slimline.measure.inputs import parity_prompts
from slimline.measure.parity import decoder_parity
from slimline.models import load_model
from tests.models import tiny_decoder
from tests.test_compile import TEXTS, context

KINDS = ("qwen2", "mistral", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2")
HEAD = 16
# The matrix's Gemma 2 carries the hard case, so that the soft-cap test below reuses its run: weights
# 25x the usual scale (attention scores of several units, where a cap of 1 is far from linear) and a
# window (8) shorter than the prompts.
HARD = {"gemma2": {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 3.0, "initializer_range": 0.5}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """kind -> its tiny model, export (with its context) and fused graph, built once per module."""
    from types import SimpleNamespace

    cache = {}

    def get(kind):
        if kind not in cache:
            tmp = tmp_path_factory.mktemp(kind)
            model = load_model(str(tiny_decoder(kind, tmp / kind, **HARD.get(kind, {}))), task="text-generation")
            ctx = context(tmp / "export")
            exported = Export().run(model, ctx)
            fused = Fuse(expect="auto").run(exported.artifact, context(tmp / "fuse"))
            cache[kind] = SimpleNamespace(model=model, ctx=ctx, exported=exported, fused=fused)
        return cache[kind]

    return get


def build(kind, tmp_path, **overrides):
    model = load_model(str(tiny_decoder(kind, tmp_path / kind, **overrides)), task="text-generation")
    exported = Export().run(model, context(tmp_path / "export"))
    return model, exported


def gqa_attributes(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        for n in graph.node
        if n.op_type == "GroupQueryAttention"
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_each_decoder_family_exports_fuses_to_its_computed_contract_and_keeps_parity(kind, runs):
    run = runs(kind)
    assert run.exported.report["parity.max_abs_error"] < 1e-4  # prefill + 5 decode steps against transformers
    fused = run.fused.report
    contract, _ = expected_fusions(family_of("text-generation"), run.model.model.config)
    assert contract and fused["contract"] == "met"
    for op, count in contract.items():
        assert fused[f"fused.{op}"] == count, (op, fused)
    assert fused["parity.max_abs_error"] < 1e-4
    if kind == "mistral":  # every layer slides: each GroupQueryAttention carries the window
        assert [a.get("local_window_size") for a in gqa_attributes(run.fused.artifact.path)] == [8, 8]


def test_gemma_scale_window_and_softcap_reach_group_query_attention(runs, tmp_path):
    run = runs("gemma2")  # HARD: scores past the cap of 1, a window shorter than the prompts
    model, exported, fused = run.model, run.exported, run.fused
    assert model.model.config._attn_implementation == "eager"  # SDPA attention would drop the cap
    assert fused.report["contract"] == "met" and fused.report["parity.max_abs_error"] < 1e-4
    layers = gqa_attributes(fused.artifact.path)
    assert [a.get("local_window_size") for a in layers] == [8, None]  # Gemma 2 alternates sliding and full layers
    assert all(a["scale"] == pytest.approx(32**-0.5) and a["softcap"] == pytest.approx(1.0) for a in layers)

    # each attribute matters: without it the fused graph's logits leave the unfused graph's
    prompts = parity_prompts(model.tokenizer, TEXTS)
    for attribute in ("softcap", "scale", "local_window_size"):
        proto = onnx.load(str(fused.artifact.path))
        for node in proto.graph.node:
            if node.op_type == "GroupQueryAttention":
                kept = [a for a in node.attribute if a.name != attribute]
                del node.attribute[:]
                node.attribute.extend(kept)
        broken = tmp_path / f"without-{attribute}.onnx"
        onnx.save(proto, str(broken))
        worst = decoder_parity(onnx_stepper(exported.artifact.path, 1), onnx_stepper(broken, 1), prompts)
        assert worst["parity.max_abs_error"] > 1e-2, attribute


def test_a_softcapped_attention_that_gqa_rejects_is_expanded_with_its_cap(tmp_path, monkeypatch):
    from onnxscript.rewriter import pattern

    from slimline.compile.fusions import group_query_attention

    _, rule, _ = group_query_attention._classes()
    monkeypatch.setattr(rule, "check", lambda self, context, **_: pattern.MatchResult().fail("rejected in this test"))
    model, exported = build("gemma2", tmp_path, attn_logit_softcapping=0.3, final_logit_softcapping=None)
    fused = Fuse(allow_partial=True, expect="auto").run(exported.artifact, context(tmp_path / "fuse"))
    graph = onnx.load(str(fused.artifact.path), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["GroupQueryAttention"] == 0 and ops["Tanh"] == 2 and not any(n.domain.endswith("_fusion") for n in graph.node)
    assert fused.report["parity.max_abs_error"] < 1e-4


def test_gpt2_projections_become_matmuls_and_generation_runs(runs):
    from slimline.generate import OnnxDecoder, Sampling

    fused = runs("gpt2").fused
    graph = onnx.load(str(fused.artifact.path), load_external_data=False).graph
    assert not any(n.op_type == "Gemm" for n in graph.node)  # Conv1D's addmm: MatMul + Add, any rank
    out = OnnxDecoder(fused.artifact.path, 1).generate(np.array([[5, 17, 42]]), Sampling(max_new_tokens=4))
    assert out.shape == (1, 4)


def test_length_dependent_rope_is_exported_with_its_original_frequencies_and_capped(tmp_path):
    """Phi-3's LongRoPE switches frequencies past its pre-training length, a branch torch.export can't
    capture: the export keeps the short frequencies, checks parity within that length, caps the
    artifact's positions there and says so; the torch model keeps its own rotary. (Its rotary tables,
    scaled by the LongRoPE attention factor, don't fuse yet: docs/models.md.)"""
    rope = {"type": "longrope", "short_factor": [1.0] * (HEAD // 2), "long_factor": [4.0] * (HEAD // 2)}
    model = load_model(
        str(tiny_decoder("phi3", tmp_path / "phi3-long", rope_scaling=rope, original_max_position_embeddings=64)),
        task="text-generation",
    )
    ctx = context(tmp_path / "export")
    exported = Export().run(model, ctx)
    assert exported.report["rope.fixed_max_positions"] == 64 and exported.report["parity.max_abs_error"] < 1e-4
    assert exported.artifact.config.max_position_embeddings == 64 and model.model.config.max_position_embeddings == 256
    assert model.model.model.rotary_emb.rope_type == "longrope"
    assert any("serves up to 64 positions" in w for w in ctx.reporter.warnings)
