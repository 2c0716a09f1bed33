"""Decoder LLMs on a tiny 2-layer Llama built in the test: export with KV cache, fusions, int4, generation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from pydantic import ValidationError

from slimline import onnxfile
from slimline.compile.export import Export
from slimline.compile.fuse import Fuse
from slimline.errors import ModelError, StageError
from slimline.evaluate.llm import windows
from slimline.generate import GenerationError, OnnxDecoder, Sampling
from slimline.models import load_model
from slimline.quantize.weight_only import WeightOnly
from tests.models import tiny_llama
from tests.test_compile import context, insert_after, with_graph


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
    return load_model(str(folder), task="text-generation")


@pytest.fixture(scope="module")
def exported(llama, tmp_path_factory):
    return Export().run(llama, context(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def fused(exported, tmp_path_factory):
    return Fuse(expect={"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 3}).run(
        exported.artifact, context(tmp_path_factory.mktemp("fuse"))
    )


def torch_greedy(model, ids, steps):
    import torch

    tokens, logits = list(ids[0]), []
    for _ in range(steps + 1):
        with torch.no_grad():
            last = model(torch.tensor([tokens])).logits[0, -1].numpy()
        logits.append(last)
        tokens.append(int(last.argmax()))
    return logits


def test_export_with_kv_cache_matches_torch_step_by_step(llama, exported):
    r = exported.report
    assert r["parity.cases"] == 12 and r["parity.max_abs_error"] < 1e-4  # prefill + 5 decode steps, 2 prompts
    decoder = OnnxDecoder(exported.artifact.path, 1)
    ids = np.array([[5, 17, 42, 8, 99, 23]])
    ref = torch_greedy(llama.model, ids, 5)
    got = [decoder.prefill(ids)[0, -1]]
    for step in range(5):
        got.append(decoder.step(np.array([int(ref[step].argmax())]))[0])
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert decoder.length == ids.shape[1] + 5


def test_batched_prefill_and_decode_match_single_sequences(exported):
    decoder = OnnxDecoder(exported.artifact.path, 1)
    ids = np.array([[5, 17, 42, 8], [9, 3, 77, 31]])
    batched = decoder.generate(ids, Sampling(max_new_tokens=4))
    for row in range(2):
        single = decoder.generate(ids[row : row + 1], Sampling(max_new_tokens=4))
        assert (single[0] == batched[row]).all()


def test_decoder_fusions_fire_and_keep_parity(fused):
    r = fused.report
    assert r["fused.GroupQueryAttention"] == 2 and r["fused.SkipSimplifiedLayerNormalization"] >= 3
    assert r["rules.merged_sibling_matmuls"] == 4  # Q/K/V and gate/up in each of 2 layers
    assert r["rules.dropped_unused_outputs"] > 0  # the norms' mean / inv_std_var, never read
    assert r["rules.packed_qkv_attention"] == 2  # GQA reads the merged Q/K/V output, no Split between
    import onnx

    graph = onnx.load(str(fused.artifact.path)).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    for gqa in (n for n in graph.node if n.op_type == "GroupQueryAttention"):
        assert made_by[gqa.input[0]] == "MatMul" and gqa.input[1] == gqa.input[2] == ""
    assert r["contract"] == "met" and r["parity.max_abs_error"] < 1e-4
    assert r["nodes_after"] < r["nodes_before"] / 2


def test_int4_weights_keep_each_layer_close_and_generation_running(fused, tmp_path):
    r = WeightOnly(bits=4, block_size=16, algorithm="gptq", head_bits=8, embedding_bits=4, min_cosine=0.5).run(
        fused.artifact, context(tmp_path)
    )
    rep = r.report
    # per layer: QKV (merged), output, gate+up (merged), down; plus the LM head
    assert rep["quantized.MatMulNBits"] == 2 * 4 + 1 and rep["quantized.GatherBlockQuantized"] == 1
    assert rep["layer_error.max"] < 0.15  # random weights at 4 bits: ~5-10% per layer
    assert rep["embedding_error.node_embedding"] < 0.15  # its own 4-bit table (the head is 8-bit: not shared)
    assert "head_bits" in rep
    out = OnnxDecoder(r.artifact.path, 1).generate(np.array([[5, 17, 42]]), Sampling(max_new_tokens=5))
    assert out.shape == (1, 5)


def test_generation_stops_at_eos(exported):
    decoder = OnnxDecoder(exported.artifact.path, 1)
    ids = np.array([[5, 17, 42, 8]])
    free = decoder.generate(ids, Sampling(max_new_tokens=8))[0]
    eos = int(free[2])
    first = int(np.flatnonzero(free == eos)[0])
    stopped = decoder.generate(ids, Sampling(max_new_tokens=8, eos_ids={eos}))[0]
    assert len(stopped) == first + 1 and stopped[-1] == eos


def test_sampling_is_seeded_and_respects_top_k(exported):
    decoder = OnnxDecoder(exported.artifact.path, 1)
    ids = np.array([[5, 17, 42, 8]])
    s = Sampling(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=3, seed=7)
    a, b = decoder.generate(ids, s)[0], decoder.generate(ids, s)[0]
    assert (a == b).all()
    logits = decoder.prefill(ids)[0, -1]
    assert int(decoder.generate(ids, s)[0, 0]) in set(np.argsort(logits)[-3:].tolist())


def test_cache_misuse_and_long_prompts_are_clear_errors(exported):
    decoder = OnnxDecoder(exported.artifact.path, 1, max_context=8)
    with pytest.raises(GenerationError, match="before prefill"):
        decoder.step(np.array([3]))
    decoder.prefill(np.array([[5, 17, 42, 8]]))
    with pytest.raises(GenerationError, match="same batch"):
        decoder.step(np.array([3, 4]))  # two tokens against a one-sequence cache
    with pytest.raises(GenerationError, match="over the model's context of 8"):
        decoder.prefill(np.arange(1, 10)[None])


def test_not_a_decoder_graph_is_refused(tmp_path):
    import onnx

    from slimline.quantize.common import single_matmul

    onnx.save_model(single_matmul(4, 4), str(tmp_path / "m.onnx"))
    with pytest.raises(GenerationError, match="not a decoder graph"):
        OnnxDecoder(tmp_path / "m.onnx")


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 3000), st.integers(16, 1024), st.integers(1, 1024))
def test_strided_perplexity_scores_every_token_exactly_once(n, context, stride):
    stride = min(stride, context)
    scored = []
    for start, end, first in windows(n, context, stride):
        assert 1 <= first and end - start <= context
        scored += list(range(start + first, end))
    assert scored == list(range(1, n))


def test_score_against_gives_the_reference_and_each_models_perplexity_kl_and_agreement():
    """One pass: a model identical to the reference has KL 0 and agreement 1; a perturbed one positive KL
    equal to the directly computed mean, and the reference's perplexity is score()'s."""
    from slimline.evaluate.llm import log_softmax, score, score_against

    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 50)).astype(np.float32)
    noise = rng.standard_normal((50, 50)).astype(np.float32)
    ref = lambda x: table[x]  # noqa: E731 - a bigram "model": logits from the current token
    other = lambda x: table[x] + 0.5 * noise[x]  # noqa: E731
    ids = rng.integers(0, 50, 300)
    base, preds, got = score_against(ref, {"same": ref, "other": other}, ids, 64, 32)
    assert np.isclose(base, score(ref, ids, 64, 32)[0]) and len(preds) == len(ids) - 1
    assert got["same"]["kl_divergence"] == 0 and got["same"]["next_token_agreement"] == 1
    assert np.isclose(got["same"]["perplexity"], base)
    p, q = log_softmax(table[ids[:-1]]), log_softmax(other(ids[:-1]))
    assert np.isclose(got["other"]["kl_divergence"], (np.exp(p) * (p - q)).sum(-1).mean())
    assert got["other"]["next_token_agreement"] < 1


def test_gguf_that_transformers_cannot_read_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match="can't read this GGUF file"):
        load_model(str(bad), task="text-generation")
    with pytest.raises(ModelError, match="set model.task: text-generation"):
        load_model(str(bad))


def test_remote_code_checkpoints_are_refused_by_default(tmp_path):
    import json

    folder = tiny_llama(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.update(
        {
            "model_type": "my-custom-llm",
            "auto_map": {"AutoModelForCausalLM": "modeling_custom.Custom", "AutoConfig": "modeling_custom.CustomConfig"},
        }
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_model(str(folder), task="text-generation")


def test_generate_cli_streams_from_a_run_folder(llama, tmp_path):
    from click.testing import CliRunner

    from slimline import recipe as R
    from slimline.cli import main
    from slimline.pipeline import run_recipe

    recipe = R.Recipe.model_validate(
        {
            "name": "tiny-llm",
            "model": {"source": str(llama.info.path), "task": "text-generation"},
            "stages": [{"compile.export": {}}, {"compile.fuse": {}}],
        }
    )
    run_recipe(recipe, tmp_path / "run", evaluate=False)
    result = CliRunner().invoke(main, ["generate", str(tmp_path / "run"), "--prompt", "the king", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output
    batch = CliRunner().invoke(
        main,
        ["generate", str(tmp_path / "run"), "--prompt", "the king", "--prompt", "now is the winter of", "--max-new-tokens", "4"],
    )
    assert batch.exit_code == 0, batch.output
    assert "[0] the king" in batch.output and "[1] now is the winter of" in batch.output and "2 prompts" in batch.output
    too_long = CliRunner().invoke(main, ["generate", str(tmp_path / "run"), "--prompt", "the king", "--max-new-tokens", "999"])
    assert too_long.exit_code == 2 and "context of 256" in too_long.output


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_embedding_shares_the_lm_head_weights(fused, tmp_path, bits):
    """One packed table serves the LM head (MatMulNBits) and the embedding (GatherBlockQuantized)."""
    import onnx

    from slimline.compile.export_llm import onnx_stepper

    r = WeightOnly(bits=4, block_size=16, head_bits=bits, embedding_bits=bits, min_cosine=0.5).run(
        fused.artifact, context(tmp_path)
    )
    assert r.report["embedding_error.node_embedding"] == "shared with the LM head"
    m = onnx.load(str(r.artifact.path))
    gbq = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output)
    init = {t.name: t for t in m.graph.initializer}
    # the Gather has its own initializers, marked as views of the head's bytes (stored once when saved)
    for mine, theirs in zip(gbq.input[:1] + gbq.input[2:], head.input[1:], strict=True):
        assert onnxfile.view_of(init[theirs]) == (mine, 0)
        assert numpy_helper.to_array(init[mine]).tobytes() == numpy_helper.to_array(init[theirs]).tobytes()
    assert not any(t.name == "model.lm_head.weight" for t in m.graph.initializer)  # the float table is gone
    sizes = [len(init[n].raw_data) for n in head.input[1:]]
    shared = sum(n for n in sizes if n >= onnxfile.THRESHOLD)
    (tmp_path / "saved").mkdir()
    stats = onnxfile.save(m, tmp_path / "saved" / "model.onnx", external=True)  # moves the weights out of `m`
    assert stats["shared"] == shared > 0  # the head's weights point into the Gather's table
    saved = onnx_stepper(tmp_path / "saved" / "model.onnx")(np.array([[5, 17, 42, 8]]), reset=True)
    np.testing.assert_array_equal(saved, onnx_stepper(r.artifact.path)(np.array([[5, 17, 42, 8]]), reset=True))
    # the shared table must decode to the real embeddings: compare with a float-embedding model, same head
    float_embedding = WeightOnly(bits=4, block_size=16, head_bits=bits, min_cosine=0.5).run(
        fused.artifact, context(tmp_path / "f")
    )
    ids = np.array([[5, 17, 42, 8]])
    a = onnx_stepper(r.artifact.path)(ids, reset=True)
    b = onnx_stepper(float_embedding.artifact.path)(ids, reset=True)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < (0.02 if bits == 8 else 0.3)  # misread scales: ~1


def test_wide_matmulnbits_split_into_parts_gives_identical_logits(fused, tmp_path):
    """max_weight_mb splits the LM head along N (the load-time peak); the parts keep their view marks."""
    import onnx

    from slimline.compile.export_llm import onnx_stepper

    common = {"bits": 4, "block_size": 16, "head_bits": 8, "embedding_bits": 8, "min_cosine": 0.5}
    whole = WeightOnly(**common, max_weight_mb=None).run(fused.artifact, context(tmp_path / "whole"))
    parts = WeightOnly(**common, max_weight_mb=0.001).run(fused.artifact, context(tmp_path / "parts"))
    split = {k: v for k, v in parts.report.items() if k.startswith("split.")}
    assert split and not any(k.startswith("split.") for k in whole.report)
    m = onnx.load(str(parts.artifact.path))
    concat = next(n for n in m.graph.node if "logits" in n.output)
    assert concat.op_type == "Concat" and len(concat.input) > 1
    init = {t.name: t for t in m.graph.initializer}
    gbq = next(n for n in m.graph.node if n.op_type == "GatherBlockQuantized")
    table = numpy_helper.to_array(init[gbq.input[0]]).tobytes()
    heads = [n for n in m.graph.node if n.output[0] in concat.input]
    for node in heads:  # each part's packed weights are a range of the Gather's table
        base, at = onnxfile.view_of(init[node.input[1]])
        weights = numpy_helper.to_array(init[node.input[1]]).tobytes()
        assert base == gbq.input[0] and table[at : at + len(weights)] == weights
    ids = np.array([[5, 17, 42, 8, 61]])
    a = onnx_stepper(whole.artifact.path)(ids, reset=True)
    np.testing.assert_array_equal(onnx_stepper(parts.artifact.path)(ids, reset=True), a)


def test_in_place_kv_cache_matches_the_copying_loop_and_grows(fused, exported):
    """GroupQueryAttention appends to fixed, bound buffers; the result is the concatenating loop's."""
    assert not OnnxDecoder(exported.artifact.path, 1).in_place  # unfused attention concatenates
    a, b = OnnxDecoder(fused.artifact.path, 1), OnnxDecoder(fused.artifact.path, 1)
    assert a.in_place
    b.in_place = False
    ids = np.array([[5, 17, 42, 8], [9, 3, 77, 31]])
    la, lb = a.prefill(ids)[:, -1], b.prefill(ids)[:, -1]
    for _ in range(20):  # past the first buffer (16 positions), so it is re-allocated once
        np.testing.assert_allclose(la, lb, atol=1e-5)
        token = lb.argmax(-1)
        la, lb = a.step(token), b.step(token)
    assert a._buffers[a.past_names[0]].shape[2] > 16 and a.length == b.length == 24
    for name, cached in a.cache().items():
        np.testing.assert_allclose(cached, b.cache()[name], atol=1e-5)


def test_gpu_cache_path_runs_on_the_cpu_and_matches_the_copying_loop(fused):
    """The CUDA loop's cache (OrtValues owned by ORT, read back by copy, regrown through the host), and
    its prompt run against the bound buffers (CUDA's GroupQueryAttention rejects an empty past),
    exercised on the CPU EP by allocating those OrtValues on the CPU."""
    a, b = OnnxDecoder(fused.artifact.path, 1), OnnxDecoder(fused.artifact.path, 1)
    assert not a.prefill_in_place  # the CPU default: the prompt goes through session.run
    a.buffer_device, a.prefill_in_place, b.in_place = ("cpu", 0), True, False
    ids = np.array([[5, 17, 42, 8], [9, 3, 77, 31]])
    pa, pb = a.prefill(ids), b.prefill(ids)
    np.testing.assert_allclose(pa, pb, atol=1e-5)  # every position of the prompt
    np.testing.assert_allclose(a.prefill(ids[:, :3], last_only=True), b.prefill(ids[:, :3], last_only=True), atol=1e-5)
    la, lb = a.prefill(ids)[:, -1], b.prefill(ids)[:, -1]
    for _ in range(20):
        np.testing.assert_allclose(la, lb, atol=1e-5)
        token = lb.argmax(-1)
        la, lb = a.step(token), b.step(token)
    assert a._capacity > 16 and not isinstance(a._buffers[a.past_names[0]], np.ndarray)
    for name, cached in a.cache().items():
        np.testing.assert_allclose(cached, b.cache()[name], atol=1e-5)


def test_fp16_decoder_keeps_an_fp16_cache_that_is_appended_in_place(fused, tmp_path):
    """quantize.fp16 on a decoder: fp16 KV cache at the graph's edge (so GroupQueryAttention can append
    to the bound buffers), fp32 logits and ids, and decoding that follows the fp32 graph."""
    from slimline.measure.metrics import cosine
    from slimline.quantize.fp16 import Fp16

    r = Fp16(keep_float=[], min_cosine=0.99).run(fused.artifact, context(tmp_path / "h"))
    assert r.report["kv_cache"] == "fp16 (8 inputs and outputs)" and r.report["calibration.mean_cosine"] > 0.999
    half, full = OnnxDecoder(r.artifact.path, 1), OnnxDecoder(fused.artifact.path, 1)
    types = {v.name: v.type for v in (*half.session.get_inputs(), *half.session.get_outputs())}
    assert types[half.past_names[0]] == types["present.0.key"] == "tensor(float16)"
    assert types["logits"] == "tensor(float)" and types["input_ids"] == "tensor(int64)"
    assert half.in_place and half.cache_dtype == np.float16
    ids = np.array([[5, 17, 42, 8]])
    lh, lf = half.prefill(ids)[:, -1], full.prefill(ids)[:, -1]
    for _ in range(20):
        assert cosine(lh, lf).min() > 0.999
        token = lf.argmax(-1)
        lh, lf = half.step(token), full.step(token)
    assert half.cache()[half.past_names[0]].dtype == np.float16
    # int4 weights with fp16 activations (the GPU build) is allowed; int8 activations are not
    w = WeightOnly(bits=4, block_size=16, min_cosine=0.5).run(fused.artifact, context(tmp_path / "w"))
    both = Fp16(min_cosine=0.99).run(w.artifact, context(tmp_path / "wh"))
    assert both.report["kv_cache"].startswith("fp16") and both.report["calibration.mean_cosine"] > 0.99


def test_fp16_keeps_the_rotary_tables_in_fp32(fused, tmp_path):
    """The cos/sin tables are computed in the graph from the positions. In fp16 a position of 200 has a
    step of 0.125, so the angles would be rounded to it (on SmolLM2 the fp16 table was off by 0.19 at
    position 2,048 even on the CPU EP). quantize.fp16 keeps the chain fp32 and casts the finished tables."""
    import onnx
    from onnx import helper

    from slimline.quantize.fp16 import Fp16

    r = Fp16(keep_float=[], min_cosine=0.99).run(fused.artifact, context(tmp_path / "h"))
    assert r.report["rotary_tables"].startswith("fp32")
    model = onnx.load(str(r.artifact.path))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for trig in (n for n in model.graph.node if n.op_type in ("Cos", "Sin")):
        angle = producers[trig.input[0]]  # position x inverse frequency
        assert all(inits.get(i, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for i in angle.input)
        position = producers[angle.input[0]]
        assert position.op_type == "Cast" and position.attribute[0].i == onnx.TensorProto.FLOAT
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    model.graph.output.append(helper.make_tensor_value_info(gqa.input[7], onnx.TensorProto.FLOAT16, None))
    path = tmp_path / "cos.onnx"
    onnx.save(model, str(path))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = 200
    decoder = OnnxDecoder(r.artifact.path, 1)
    feeds = {
        "input_ids": np.ones((1, 1), np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.array([[n - 1]], np.int64),
        **{p: np.zeros((1, decoder.kv_heads, n - 1, decoder.head_dim), np.float16) for p in decoder.past_names},
    }
    table = sess.run([gqa.input[7]], feeds)[0].astype(np.float64)
    config = fused.artifact.config
    dim = decoder.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, dim, 2) / dim)
    want = np.cos(np.arange(n)[:, None] * inv[None])
    assert table.shape == want.shape and np.abs(table - want).max() < 1e-3  # fp16 output rounding only


def test_8bit_weights_take_their_own_block_size(fused, tmp_path):
    import onnx
    from onnx import helper

    r = WeightOnly(bits=4, block_size=16, head_bits=8, embedding_bits=8, block_size_8bit=32, min_cosine=0.5).run(
        fused.artifact, context(tmp_path)
    )
    assert r.report["block_size_8bit"] == 32
    seen = set()
    for node in onnx.load(str(r.artifact.path)).graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            seen.add((node.op_type, a["bits"], a["block_size"]))
    assert seen == {("MatMulNBits", 4, 16), ("MatMulNBits", 8, 32), ("GatherBlockQuantized", 8, 32)}


def test_logits_to_keep_defaults_to_every_position_and_prefill_can_keep_the_last(fused):
    decoder = OnnxDecoder(fused.artifact.path, 1)
    ids = np.array([[5, 17, 42, 8, 99]])
    assert decoder.can_keep_last  # compile.export added it and compile.fuse kept it an input
    every = decoder.prefill(ids)
    last = decoder.prefill(ids, last_only=True)
    assert every.shape[1] == 5 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], every[:, -1], atol=1e-5)


def test_sibling_matmul_merge_positive_variant_and_negative(tmp_path):
    """Three MatMuls on one input merge (outputs equal); two with different K, or a dynamic weight, don't."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from slimline.compile.fusions.sibling_matmul import merge_sibling_matmuls
    from slimline.runtime import ort_session

    rng = np.random.default_rng(0)

    def graph(weights, extra_inputs=()):
        inits = [numpy_helper.from_array(w, f"W{i}") for i, w in enumerate(weights)]
        nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"], name=f"mm{i}") for i in range(len(weights))]
        nodes += [helper.make_node("Relu", [f"y{i}"], [f"r{i}"]) for i in range(len(weights))]
        outs = [helper.make_tensor_value_info(f"r{i}", TensorProto.FLOAT, None) for i in range(len(weights))]
        ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])]
        return helper.make_model(helper.make_graph(nodes, "g", ins, outs, inits), opset_imports=[helper.make_opsetid("", 18)])

    m = graph([rng.standard_normal((8, n)).astype(np.float32) for n in (8, 4, 4)])  # Q, K, V-like
    onnx.save_model(m, str(tmp_path / "a.onnx"))
    merged, rejected = merge_sibling_matmuls(m)
    onnx.save_model(m, str(tmp_path / "b.onnx"))
    assert merged == 1 and not rejected and sum(n.op_type == "MatMul" for n in m.graph.node) == 1
    x = {"x": rng.standard_normal((3, 8)).astype(np.float32)}
    for a, b in zip(
        ort_session(tmp_path / "a.onnx", 1).run(None, x), ort_session(tmp_path / "b.onnx", 1).run(None, x), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)

    m2 = graph([rng.standard_normal((8, 4)).astype(np.float32)])
    m2.graph.node[0].input[1] = "x"  # x @ x: not a constant weight (and the shapes would not even agree)
    assert merge_sibling_matmuls(m2)[0] == 0
    m3 = graph([rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)])
    m3.graph.output[0].name = "y0"  # one MatMul output is a graph output: keep it a separate node
    assert merge_sibling_matmuls(m3) == (0, {"x": "mm0: output is a graph output"})


def test_merged_matmuls_keep_their_layer_role(fused):
    """compile.fuse's merged Q/K/V and gate/up MatMuls still answer to their roles (a recipe's `layers` and
    `exclude` select them), one node per layer."""
    import onnx

    from slimline.family import layers_by_role
    from slimline.quantize.common import module_path

    m = onnx.load(str(fused.artifact.path), load_external_data=False)
    paths = {n.name: module_path(n) for n in m.graph.node if n.op_type == "MatMul"}
    for selector in ("role:attention.qkv@0", "role:ffn.in@-1"):
        found, error = layers_by_role(paths, selector)
        assert error is None and len(found) == 1 and "+" in found[0], (selector, found)
    assert len(layers_by_role(paths, "role:attention.qkv")[0]) == 2  # both layers


def test_text_generation_run_reports_perplexity_speed_and_budgets(llama, tmp_path):
    """evaluate.llm end to end on the tiny Llama: the report has the encoder schema plus LLM figures."""
    from slimline import recipe as R
    from slimline.evaluate.report import validate_report
    from slimline.pipeline import run_recipe

    recipe = R.Recipe.model_validate(
        {
            "name": "tiny-llm",
            "model": {"source": str(llama.info.path), "task": "text-generation"},
            "stages": [
                {"compile.export": {}},
                {"compile.fuse": {}},
                {"quantize.weight_only": {"block_size": 16, "min_cosine": 0}},
            ],
            "evaluate": {
                "data": {"source": "builtin:shakespeare", "calibration_size": 16, "evaluation_size": 60},
                "targets": ["ort-cpu", "ort-cuda"],
                "memory": False,
                "speed": {"repeats": 1},
                "generation": {
                    "perplexity_tokens": 256,
                    "context": 64,
                    "stride": 32,
                    "prompt_lengths": [16],
                    "decode_batch_sizes": [1, 2],
                    "new_tokens": 4,
                    "decode_prompt": 8,
                },
                "budgets": {"max_accuracy_drop": {"perplexity": "50%", "kl_divergence": 5.0}, "min_speedup": 0.01},
            },
        }
    )
    report = run_recipe(recipe, tmp_path / "run")
    assert not validate_report(report)
    modes = {(r["variant"], r["mode"], r["batch_size"]) for r in report["results"]}
    assert {("compressed", "decode", 2), ("baseline", "prefill", 1)} <= modes
    s = report["summary"]["ort-cpu"]
    assert s["accuracy"]["perplexity"] > 1 and 0 <= s["accuracy"]["next_token_agreement"] <= 1
    assert 0 < s["accuracy"]["kl_divergence"] < 5 and s["baseline_accuracy"]["kl_divergence"] == 0
    assert set(s["decode_tokens_per_s"]) == {"1", "2"} and s["speedup"] is not None
    budgets = {b["name"]: b for b in report["budgets"]}
    assert set(budgets) == {"max_accuracy_drop.perplexity", "max_accuracy_drop.kl_divergence", "min_speedup"}
    assert budgets["max_accuracy_drop.kl_divergence"]["passed"]
    assert (tmp_path / "run" / "report.md").read_text().count("decode") >= 4
    from slimline.evaluate.targets import available

    if not available("ort-cuda")[0]:  # skipped with its reason; an optional target fails no budget
        assert [t["target"] for t in report["skipped_targets"]] == ["ort-cuda"]
        assert "CUDAExecutionProvider" in report["skipped_targets"][0]["reason"]
        assert {r["target"] for r in report["results"]} == {"torch-cpu", "ort-cpu"}


def test_decoder_rules_variant_full_heads(tmp_path):
    """Variant: as many KV heads as query heads. No K/V grouping, so GroupQueryAttention's rule
    says why not, and the layer becomes MultiHeadAttention with past plus RotaryEmbedding."""
    folder = tiny_llama(tmp_path / "mha-llama", heads=4, kv_heads=4)
    model = load_model(str(folder), task="text-generation")
    exp = Export().run(model, context(tmp_path / "e"))
    expect = {"MultiHeadAttention": 2, "RotaryEmbedding": 4, "SkipSimplifiedLayerNormalization": 3}
    r = Fuse(expect=expect).run(exp.artifact, context(tmp_path / "f")).report
    assert r["contract"] == "met" and r["parity.max_abs_error"] < 1e-4
    assert "fused.GroupQueryAttention" not in r
    assert any(k.startswith("unfused_at.GroupQueryAttention") and "layers.0" in k for k in r)


def _rotary_broken(artifact, tmp_path):
    """The exported decoder with an extra Relu after layer 0's first rotate-half Neg."""
    import onnx

    graph = onnx.load(str(artifact.path))
    insert_after(graph, next(n for n in graph.graph.node if n.op_type == "Neg"))
    return with_graph(artifact, graph, tmp_path / "broken")


def test_decoder_rules_negative_broken_rotary_names_what_did_not_fuse(exported, tmp_path):
    """Negative: a rotary that is not rotate-half any more. That layer's attention must stay
    unfused (GroupQueryAttention rotates internally), the other layer fuses, outputs stay equal."""
    broken = _rotary_broken(exported.artifact, tmp_path)
    ctx = context(tmp_path / "f")
    r = Fuse(expect={"GroupQueryAttention": 2}, allow_partial=True).run(broken, ctx).report
    assert r["contract"] == "partial" and r["fused.GroupQueryAttention"] == 1
    assert any(k.startswith("unfused_at.GroupQueryAttention") for k in r), r
    assert r["parity.max_abs_error"] < 1e-4
    with pytest.raises(StageError, match="GroupQueryAttention: expected 2, got 1"):
        Fuse(expect={"GroupQueryAttention": 2}).run(broken, context(tmp_path / "g"))


def test_skip_rms_norm_negative_when_skipped(exported, tmp_path):
    """Negative by request: `skip` leaves the RMSNorms unfused, and the rest still fuses."""
    r = (
        Fuse(skip=["SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"])
        .run(exported.artifact, context(tmp_path))
        .report
    )
    assert "fused.SkipSimplifiedLayerNormalization" not in r and "fused.SimplifiedLayerNormalization" not in r
    assert r["parity.max_abs_error"] < 1e-4


def test_wanda_2_4_prunes_the_decoder_and_the_pattern_survives_export_and_fusion(llama, tmp_path):
    """Weight pruners work on the decoder's Linear layers (the tied LM head left alone); the pruned model
    exports with its KV cache, fuses, and generates, and its fused MatMul weights are still 2:4."""
    import onnx
    from onnx import numpy_helper

    from slimline.prune.unstructured import Wanda

    pruned = Wanda(pattern="nm").run(llama, context(tmp_path / "p"))
    assert pruned.report["sparsity.overall"] == 0.5
    assert not any("lm_head" in k or "embed" in k for k in pruned.report if k.startswith("sparsity."))
    exported = Export().run(pruned.artifact, context(tmp_path / "e"))
    fused = Fuse(expect={"GroupQueryAttention": 2}).run(exported.artifact, context(tmp_path / "f"))
    graph = onnx.load(str(fused.artifact.path)).graph
    init = {t.name: t for t in graph.initializer}
    checked = 0
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in init and "logits" not in node.output:
            w = numpy_helper.to_array(init[node.input[1]])  # [K, N]: 2:4 along K, the input dimension
            if min(w.shape) < 16:  # the rotary frequency table, not a layer
                continue
            groups = (w.T.reshape(w.shape[1], -1, 4) != 0).sum(-1)
            assert (groups <= 2).all()
            checked += 1
    assert checked >= 4  # merged Q/K/V, o, merged gate/up, down in each layer
    out = OnnxDecoder(fused.artifact.path, 1).generate(np.array([[5, 17, 42]]), Sampling(max_new_tokens=4))
    assert out.shape == (1, 4)


def test_evaluate_command_measures_a_folder_built_without_evaluation(llama, tmp_path):
    """Build on one machine (`run --no-eval`), measure on another (`slimline evaluate RUN_DIR`): the
    manifest's recipe is used with --set overrides, which do not rewrite the recipe it records."""
    import json

    import yaml
    from click.testing import CliRunner

    from slimline.cli import main

    recipe = {
        "name": "tiny-llm",
        "model": {"source": str(llama.info.path), "task": "text-generation"},
        "stages": [{"compile.export": {}}, {"compile.fuse": {}}],
        "evaluate": {
            "data": {"source": "builtin:shakespeare", "calibration_size": 8, "evaluation_size": 40},
            "targets": ["ort-cuda"],
            "required_targets": ["ort-cuda"],
            "memory": False,
            "speed": {"enabled": False},
            "generation": {"perplexity_tokens": 256, "context": 64, "stride": 32},
            "budgets": {"max_accuracy_drop": {"perplexity": "1%"}},
        },
    }
    path, run = tmp_path / "r.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(recipe))
    built = CliRunner().invoke(main, ["run", str(path), "--out", str(run), "--no-eval"])
    assert built.exit_code == 0, built.output
    assert not (run / "report.json").exists()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        # as recorded: the required target can't run here, so the run fails with the reason, and the
        # report it writes is still one that `slimline check` reads (this crashed before)
        failed = CliRunner().invoke(main, ["evaluate", str(run)])
        assert failed.exit_code == 1 and "Traceback" not in failed.output, failed.output
        checked = CliRunner().invoke(main, ["check", str(run)])
        assert checked.exit_code == 1 and "ort-cuda" in checked.output, checked.output
    result = CliRunner().invoke(
        main, ["evaluate", str(run), "--set", "evaluate.targets=[ort-cpu]", "--set", "evaluate.required_targets=[]"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    assert report["passed"] and report["summary"]["ort-cpu"]["perplexity_increase"] < 0.01
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe"]["evaluate"]["targets"] == ["ort-cuda"]  # as built
    assert manifest["stages"][-1]["kind"] == "evaluate" and manifest["stages"][-1]["overrides"][0] == "evaluate.targets=[ort-cpu]"
    missing = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not a run folder" in missing.output and "Traceback" not in missing.output


def test_fallback_tries_smaller_blocks_before_more_bits(fused, tmp_path):
    """fallback: auto's ladder: a layer over max_layer_error first gets `bits` in smaller blocks, and
    goes to fallback_bits only if that is still over; each rung is reported with its error."""
    import onnx
    from onnx import helper

    base = WeightOnly(bits=4, block_size=32, min_cosine=0.5).run(fused.artifact, context(tmp_path / "b"))
    limit = base.report["layer_error.median"]  # about half the layers are over it at blocks of 32
    r = WeightOnly(
        bits=4, block_size=32, fallback="auto", max_layer_error=limit, fallback_block_size=16, fallback_bits=8, min_cosine=0.5
    ).run(fused.artifact, context(tmp_path / "l"))
    finer = {k[len("fallback.") :]: v for k, v in r.report.items() if k.startswith("fallback.") and "blocks of 16" in v}
    eight = {k[len("fallback.") :] for k, v in r.report.items() if k.startswith("fallback.") and "8-bit" in v}
    assert finer and r.report["fallback_block_16"] == len(finer)
    assert all(float(v.rsplit("(", 1)[1].rstrip(")")) <= limit for v in finer.values())
    nodes = {
        n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for n in onnx.load(str(r.artifact.path)).graph.node
        if n.op_type == "MatMulNBits"
    }
    for name in finer:
        assert (nodes[name]["bits"], nodes[name]["block_size"]) == (4, 16)
    for name in eight:
        assert nodes[name]["bits"] == 8
    with pytest.raises(ValidationError, match="fallback_block_size 32 needs fallback: auto and a block_size larger"):
        WeightOnly(bits=4, block_size=32, fallback="auto", fallback_block_size=32)  # refused at recipe load


@pytest.mark.parametrize("on_bound_buffers", [False, True])
def test_prompts_of_different_lengths_generate_what_each_generates_alone(fused, exported, on_bound_buffers):
    """Right-padded prompts with `lengths`: the fused graph takes each row's length off attention_mask
    (compile.fuse's lengths-from-mask rewrite), so every row decodes exactly as it does alone."""
    import onnx

    graph = onnx.load(str(fused.artifact.path), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[5] == "slimline_mask_seqlens_k" and n.input[6] == "slimline_mask_total_seq_len" for n in gqa)
    assert not any(n.op_type == "ReduceMax" for n in graph.node)  # positions no longer give the lengths
    prompts = [[5, 17, 42, 8, 9, 11, 3], [9, 3, 77], [1, 2, 3, 4, 5]]
    width = max(map(len, prompts))
    ids = np.array([p + [0] * (width - len(p)) for p in prompts])
    d = OnnxDecoder(fused.artifact.path, 1)
    d.prefill_in_place = on_bound_buffers
    together = d.generate(ids, Sampling(max_new_tokens=20), lengths=[len(p) for p in prompts])  # past 16: regrows
    for row, p in enumerate(prompts):
        alone = OnnxDecoder(fused.artifact.path, 1).generate(np.array([p]), Sampling(max_new_tokens=20))
        assert together[row].tolist() == alone[0].tolist()
    first = d.prefill(ids, last_only=True, lengths=[7, 3, 5])
    np.testing.assert_allclose(first[1, 0], OnnxDecoder(fused.artifact.path, 1).prefill(np.array([prompts[1]]))[0, -1], atol=1e-4)
    with pytest.raises(GenerationError, match="need the fused graph"):
        OnnxDecoder(exported.artifact.path, 1).generate(ids, Sampling(max_new_tokens=2), lengths=[7, 3, 5])
    with pytest.raises(GenerationError, match="must give each of the 3 rows a length in 1..7"):
        d.prefill(ids, lengths=[7, 0, 5])


def test_structured_ffn_pruning_shrinks_the_decoder_and_it_still_exports_and_fuses(llama, tmp_path):
    """prune.structured on a Llama: FFN channels go from gate/up (rows) and down (columns), down is refit,
    the config says the new size, and the smaller graph still exports, fuses and generates. Heads are refused."""
    from slimline.prune.structured import Structured

    ctx = context(tmp_path / "p")
    r = Structured(ffn_sparsity=0.25, samples=16).run(llama, ctx)
    ffn = llama.model.config.intermediate_size
    mlp = r.artifact.model.model.layers[0].mlp
    assert (
        r.artifact.model.config.intermediate_size
        == ffn - round(0.25 * ffn)
        == mlp.gate_proj.out_features
        == mlp.down_proj.in_features
    )
    assert r.report["params_after"] < r.report["params_before"] and r.report["calibration.in_sample.mean_cosine"] > 0.5
    assert 0 <= r.report["calibration.in_sample.top1_agreement"] <= 1
    assert llama.model.model.layers[0].mlp.gate_proj.out_features == ffn  # the input model is untouched
    exported = Export().run(r.artifact, context(tmp_path / "e"))
    fused = Fuse(expect={"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 3}).run(
        exported.artifact, context(tmp_path / "f")
    )
    out = OnnxDecoder(fused.artifact.path, 1).generate(np.array([[5, 17, 42]]), Sampling(max_new_tokens=4))
    assert out.shape == (1, 4)
    # 4 query heads on 2 key/value heads: per_group can't cut 1 of 2 without leaving a lone head per group
    with pytest.raises(StageError, match="keep at least 2 per group, or set gqa_heads: whole_groups"):
        Structured(head_sparsity=0.5, samples=16).run(llama, ctx)
    with pytest.raises(StageError, match="removes no query head.*Raise head_sparsity to 0.50 or more"):
        Structured(head_sparsity=0.2, samples=16).run(llama, ctx)
    with pytest.raises(StageError, match="removes no key/value group of 2. Raise it to 0.50 or more"):
        Structured(head_sparsity=0.2, gqa_heads="whole_groups", samples=16).run(llama, ctx)
    with pytest.raises(StageError, match="would remove all 2 key/value groups.*0.50 or less"):
        Structured(head_sparsity=0.9, gqa_heads="whole_groups", samples=16).run(llama, ctx)
    with pytest.raises(StageError, match="head_allocation: sensitivity is for BERT-family encoders"):
        Structured(ffn_sparsity=0.25, head_allocation="sensitivity", samples=16).run(llama, ctx)
    with pytest.raises(StageError, match="refit_target: original is for BERT-family encoders"):
        Structured(ffn_sparsity=0.25, refit_target="original", samples=16).run(llama, ctx)


@pytest.mark.parametrize(
    ("gqa_heads", "heads", "kv_heads"),
    [("per_group", 4, 2), ("whole_groups", 3, 1)],  # from 6 query heads on 2 key/value heads
)
def test_structured_head_pruning_of_a_gqa_decoder(gqa_heads, heads, kv_heads, tmp_path):
    """Query heads go under grouped-query attention: the same number from every key/value group (the KV
    cache keeps its size), or whole groups (the cache shrinks). Each layer's q/k/v/o shrink to match, the
    config says so, the model still computes what it computes with the cut heads' weights zeroed and
    o_proj refit, and the export still fuses to GroupQueryAttention and matches torch."""
    import torch

    from slimline.prune.structured import Structured

    model = load_model(str(tiny_llama(tmp_path / "m", hidden=96, heads=6, kv_heads=2)), task="text-generation")
    r = Structured(head_sparsity=1 / 3 if gqa_heads == "per_group" else 0.5, gqa_heads=gqa_heads, samples=16).run(
        model, context(tmp_path / "p")
    )
    pruned, config = r.artifact.model, r.artifact.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (heads, kv_heads, 16)
    for i, layer in enumerate(pruned.model.layers):
        a = layer.self_attn
        assert a.q_proj.out_features == a.o_proj.in_features == heads * 16
        assert a.k_proj.out_features == a.v_proj.out_features == kv_heads * 16
        assert a.num_key_value_groups == heads // kv_heads
        gone = [int(h) for h in r.report[f"pruned_heads.layer{i}"].split(",")]
        assert len(gone) == 6 - heads
        if gqa_heads == "per_group":  # one from each key/value group (heads 0-2 read kv 0, 3-5 kv 1)
            assert sorted(h // 3 for h in gone) == [0, 1]
        else:  # a whole group: three consecutive heads
            assert gone in ([0, 1, 2], [3, 4, 5])
    assert r.report["heads_per_layer"] == heads and r.report["kv_heads_per_layer"] == kv_heads
    assert r.report["params_after"] < r.report["params_before"]
    assert model.model.config.num_attention_heads == 6  # the input is untouched
    # the smaller torch model and its fused export agree
    exported = Export().run(r.artifact, context(tmp_path / "e"))
    fused = Fuse(expect={"GroupQueryAttention": 2}).run(exported.artifact, context(tmp_path / "f"))
    ids = np.array([[5, 17, 42, 8, 9]])
    with torch.no_grad():
        want = pruned(torch.tensor(ids)).logits.numpy()
    got = OnnxDecoder(fused.artifact.path, 1).prefill(ids)
    np.testing.assert_allclose(got, want, atol=2e-4)
    d = OnnxDecoder(fused.artifact.path, 1)
    assert d.kv_heads == kv_heads
    assert d.generate(ids, Sampling(max_new_tokens=4)).shape == (1, 4)


def test_gqa_probe_reference_matches_the_cpu_ep_and_bisect_runs(fused):
    """benchmarks/gqa_probe.py, the CUDA diagnostic: on the CPU EP every GroupQueryAttention form (packed
    or not, rotary or not; prompt with an empty past, prompt into a shared buffer, decode step) matches
    its numpy reference, so a mismatch on a GPU is the GPU's. The node-by-node bisection runs on a
    fused decoder and flags exactly the outputs that differ."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "gqa_probe.py"
    spec = importlib.util.spec_from_file_location("gqa_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rows = probe.probe_op("CPUExecutionProvider")
    assert len(rows) == 12 and not [r for r in rows if "error" in r]
    assert max(max(r["output"], r["present"]) for r in rows) < 2e-3
    folder = Path(fused.artifact.path).parent
    assert probe.bisect(folder, ("CPU", "CPU")) == []
    assert not list(folder.glob("bisect*"))  # its temporary model is gone
    x = np.ones(4, np.float32)
    node = type("N", (), {"op_type": "Mul", "name": "m"})
    found = probe.disagreements(
        ["a", "b", "c"], {"a": x, "b": x, "c": x}, {"a": x, "b": x * 1.5, "c": x * 2}, {o: node for o in "abc"}, top=1
    )
    assert [r["output"] for r in found] == ["b"]


def test_recover_distils_a_pruned_decoder_by_next_token_kl(llama, tmp_path):
    """prune.recover on a language model trains on the next-token KL (loss: auto picks it for
    text-generation) and reports top-1 agreement and KL before and after on held-back text."""
    import torch

    from slimline.prune.common import clone
    from slimline.prune.recover import Recover
    from slimline.prune.structured import Structured

    teacher = clone(llama)  # a random model's next-token distributions are near uniform: sharpen them
    with torch.no_grad():
        teacher.model.model.norm.weight.mul_(30)
    ctx = context(tmp_path)
    ctx.reference = teacher
    pruned = Structured(ffn_sparsity=0.5, refit=False, samples=16).run(teacher, ctx).artifact
    r = Recover(steps=40, batch_size=4, lr=3e-4, held_out=4, max_length=32).run(pruned, ctx)
    assert r.report["loss"] == "kl"
    assert r.report["held_out.token_kl.after"] < r.report["held_out.token_kl.before"]
    assert 0 <= r.report["held_out.top1_agreement.before"] <= 1


def _with_massive_activation(artifact, folder, value: float):
    """The fused graph with ``value`` added to channel 0 of every token's embedding: a decoder's "massive
    activation" (SmolLM2's residual reaches 24,926 in one channel on its first position)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(artifact.path))
    gather = next(n for n in graph.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    width = artifact.config.hidden_size
    bump = np.zeros(width, np.float32)
    bump[0] = value
    graph.graph.initializer.append(numpy_helper.from_array(bump, "massive_bump"))
    out, new = gather.output[0], f"{gather.output[0]}_massive"
    for reader in graph.graph.node:
        reader.input[:] = [new if i == out else i for i in reader.input]
    index = list(graph.graph.node).index(gather)
    graph.graph.node.insert(index + 1, helper.make_node("Add", [out, "massive_bump"], [new], name="massive_add"))
    return with_graph(artifact, graph, folder)


def test_fp16_keeps_norms_whose_fp16_sum_of_squares_would_overflow_in_fp32(fused, tmp_path):
    """ONNX Runtime's CUDA Skip(Simplified)LayerNormalization sums x^2/width in fp16: a row with one
    channel at 3,000 in a 64-wide hidden state has mean square 140,625 > 65504, so CUDA would normalise it
    to zeros. The CPU EP (the fidelity check) hides that, so quantize.fp16 measures it and keeps those
    nodes fp32; the plain model's norms (mean square ~1) stay fp16."""
    import onnx

    from slimline.quantize.fp16 import Fp16

    plain = Fp16(keep_float=[], min_cosine=0.99).run(fused.artifact, context(tmp_path / "plain"))
    assert "fp16_overflow_guard" not in plain.report and "% of fp16's 65504" in plain.report["fp16_headroom"]
    massive = _with_massive_activation(fused.artifact, tmp_path / "massive", 3000.0)
    r = Fp16(keep_float=[], min_cosine=0.99).run(massive, context(tmp_path / "h"))
    model = onnx.load(str(r.artifact.path))
    norms = sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in model.graph.node)
    assert r.report["fp16_overflow_guard"].startswith(f"{norms} of {norms} Skip*LayerNormalization nodes kept fp32")
    assert r.report["fp16_headroom"].startswith("max |x| 3")  # 3,000 plus the embedding: 4.6% of the range
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    producers = {o: n for n in model.graph.node for o in n.output}
    for norm in (n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"):
        for name in norm.input[:2]:  # both inputs arrive fp32, either cast up or from an fp32 norm
            source = producers.get(name)
            assert types.get(name) == onnx.TensorProto.FLOAT or (
                source and source.op_type == "Cast" and source.attribute[0].i == 1
            )


def test_fp16_refuses_a_tensor_past_fp16s_range_naming_it(fused, tmp_path):
    from slimline.quantize.fp16 import Fp16

    massive = _with_massive_activation(fused.artifact, tmp_path / "massive", 70000.0)
    with pytest.raises(
        StageError,
        match=r"exceed fp16's range \(65504\) on calibration text: add_\d+ \(SkipSimplifiedLayerNormalization, 7e\+04\).*keep_float",
    ):
        Fp16(keep_float=[], min_cosine=0.99).run(massive, context(tmp_path / "h"))
    assert not (tmp_path / "h" / "quantize_fp16" / "model.onnx").exists()


def test_a_model_over_the_inline_limit_goes_through_export_fuse_and_int4_in_external_data(llama, tmp_path, monkeypatch):
    """A decoder whose export and stage graphs exceed the inline limit (a 0.5B+ model; forced here on the
    tiny one) keeps its weights in external data at every stage, and the fused graph's references
    don't dangle (issue 23's "should be stored in model.onnx.data, but it is not regular file")."""
    from slimline import onnxfile
    from slimline.compile import export_llm

    monkeypatch.setattr(export_llm, "_large", lambda model: True)
    monkeypatch.setattr(onnxfile, "INLINE_LIMIT", 0)
    exported = Export().run(llama, context(tmp_path / "export"))
    assert (exported.artifact.path.parent / "model.onnx.data").is_file()
    fused = Fuse(expect="auto").run(exported.artifact, context(tmp_path / "fuse"))
    assert (fused.artifact.path.parent / "model.onnx.data").is_file()
    assert fused.report["contract"] == "met" and fused.report["parity.max_abs_error"] < 1e-4
    quantized = WeightOnly(bits=4, block_size=16, min_cosine=0.5).run(fused.artifact, context(tmp_path / "int4"))
    assert (quantized.artifact.path.parent / "model.onnx.data").is_file()
    out = OnnxDecoder(quantized.artifact.path, 1).generate(np.array([[5, 17, 42]]), Sampling(max_new_tokens=3))
    assert out.shape == (1, 3)


@pytest.mark.parametrize("ragged", [False, True])
def test_fixed_shape_decode_step_matches_the_growing_mask(fused, ragged):
    """The CUDA-graph decode step (every input at a fixed shape and address, a mask as wide as the cache
    with zeros past each row's length) gives the same logits and tokens as the growing-mask step; run on
    the CPU EP with the step's buffers on the CPU, as the GPU can't be here."""
    prompts = [[5, 17, 42, 8, 9, 11, 3], [9, 3, 77]] if ragged else [[5, 17, 42, 8], [9, 3, 77, 31]]
    width = max(map(len, prompts))
    ids = np.array([p + [0] * (width - len(p)) for p in prompts])
    lengths = [len(p) for p in prompts] if ragged else None
    a, b = OnnxDecoder(fused.artifact.path, 1), OnnxDecoder(fused.artifact.path, 1)
    a.static_step, a.buffer_device = True, ("cpu", 0)
    ta = a.generate(ids, Sampling(max_new_tokens=24), lengths=lengths)  # past 16 positions: the buffers regrow
    tb = b.generate(ids, Sampling(max_new_tokens=24), lengths=lengths)
    assert ta.tolist() == tb.tolist()
    assert a._mask.shape[1] == a._capacity > 16 and a._step_values["logits"].shape()[1] == 1
    la, lb = a.prefill(ids[:1, :4])[:, -1], b.prefill(ids[:1, :4])[:, -1]
    for _ in range(6):
        np.testing.assert_allclose(la, lb, atol=1e-5)
        token = lb.argmax(-1)
        la, lb = a.step(token), b.step(token)


def test_cuda_graph_needs_the_cuda_ep(fused):
    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        pytest.skip("this machine's onnxruntime has the CUDA EP: benchmarks/gpu_decode.py checks the real thing")
    with pytest.raises(GenerationError, match="cuda_graph needs the CUDA EP"):
        OnnxDecoder(fused.artifact.path, 1, cuda_graph=True)


def test_rotary_tables_as_constants_give_the_same_logits_and_leave_no_table_chain(exported, fused, tmp_path):
    """compile.fuse rotary_tables: GroupQueryAttention's cos/sin caches become constant tables for the
    whole context; the per-run chain (Range over the mask's length, Cos, Sin) is gone, and decoding
    is unchanged."""
    import onnx

    r = Fuse(expect={"GroupQueryAttention": 2}, rotary_tables=True).run(exported.artifact, context(tmp_path / "f"))
    assert "as initializers" in r.report["rotary_tables"]
    graph = onnx.load(str(r.artifact.path), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"Cos", "Sin", "Range"}
    tables = {t.name: t for t in graph.initializer if t.name.startswith("slimline_rotary_")}
    assert tables["slimline_rotary_cos"].dims[0] == exported.artifact.config.max_position_embeddings
    a, b = OnnxDecoder(r.artifact.path, 1), OnnxDecoder(fused.artifact.path, 1)
    ids = np.array([[5, 17, 42, 8], [9, 3, 77, 31]])
    np.testing.assert_allclose(a.prefill(ids), b.prefill(ids), atol=1e-5)
    assert a.generate(ids, Sampling(max_new_tokens=12)).tolist() == b.generate(ids, Sampling(max_new_tokens=12)).tolist()


@pytest.mark.parametrize("graph", ["fused", "exported"])
def test_prompt_lookup_speculative_decoding_gives_the_greedy_tokens(fused, exported, graph):
    """Exact greedy speculative decoding: drafts copied from earlier text, verified in one run, the KV
    cache cut back after the last kept draft; on the in-place (fused) and the copying (unfused) cache."""
    from slimline.generate import lookup_draft

    assert lookup_draft([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2] and lookup_draft([5, 6], 4) == []
    assert lookup_draft([7, 1, 2, 8, 3, 2], 2) == [8, 3]  # falls back to the 1-gram [2]
    path = (fused if graph == "fused" else exported).artifact.path
    prompts = [[5, 17, 42, 8, 5, 17, 42, 8, 5, 17], [9, 3, 77, 31, 2]]
    accepted = 0
    for p in prompts:
        plain = OnnxDecoder(path, 1).generate(np.array([p]), Sampling(max_new_tokens=30))
        d = OnnxDecoder(path, 1)
        streamed = []
        fast = d.generate(
            np.array([p]), Sampling(max_new_tokens=30, prompt_lookup=4), on_token=lambda t, s=streamed: s.append(int(t[0]))
        )
        assert fast.tolist() == plain.tolist() and streamed == plain[0].tolist()
        assert len(p) + 29 <= d.length <= len(p) + 30  # the cache holds every emitted token but maybe the last
        accepted += d.lookup_stats["accepted"]
        assert d.lookup_stats["runs"] < 29 or d.lookup_stats["accepted"] == 0
    assert accepted > 0  # the tiny model repeats itself: some drafts are kept
    with pytest.raises(GenerationError, match="needs greedy decoding"):
        OnnxDecoder(path, 1).generate(np.array([[1, 2]]), Sampling(max_new_tokens=3, prompt_lookup=2, do_sample=True))


def test_prompt_lookup_stops_at_eos_and_at_the_token_budget(fused):
    d = OnnxDecoder(fused.artifact.path, 1)
    plain = d.generate(np.array([[5, 17, 42, 8, 5, 17, 42]]), Sampling(max_new_tokens=12))
    eos = int(plain[0, 5])
    first = plain[0].tolist().index(eos)
    out = d.generate(np.array([[5, 17, 42, 8, 5, 17, 42]]), Sampling(max_new_tokens=12, prompt_lookup=3, eos_ids={eos}))
    assert out[0].tolist() == plain[0, : first + 1].tolist()
    for n in (1, 2, 7):
        got = d.generate(np.array([[5, 17, 42, 8, 5, 17, 42]]), Sampling(max_new_tokens=n, prompt_lookup=5))
        assert got[0].tolist() == plain[0, :n].tolist()


def test_prompt_lookup_warns_where_int4_kernels_quantize_multi_token_runs(fused, tmp_path):
    """accuracy_level 4: ONNX Runtime's int4 kernel quantizes a multi-token run's activations and not a
    one-token run's, so speculative decoding can't promise the plain loop's tokens; it says so."""
    r = WeightOnly(bits=4, block_size=16, accuracy_level=4, min_cosine=0.5).run(fused.artifact, context(tmp_path / "w"))
    d = OnnxDecoder(r.artifact.path, 1)
    assert not d.exact_multi_token and OnnxDecoder(fused.artifact.path, 1).exact_multi_token
    with pytest.warns(UserWarning, match="accuracy_level"):
        out = d.generate(np.array([[5, 17, 42, 8]]), Sampling(max_new_tokens=6, prompt_lookup=3))
    assert out.shape == (1, 6)
