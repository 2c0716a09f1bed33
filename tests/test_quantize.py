"""Dynamic int8 on the tiny fused BERT: what it quantizes, the error it reports, the inputs it refuses."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimline.compile.export import Export
from slimline.compile.fuse import Fuse
from slimline.errors import StageError
from slimline.measure.metrics import sqnr_db
from slimline.models import load_model
from slimline.quantize.dynamic import DynamicInt8
from slimline.quantize.error import _broadcast
from tests.test_compile import context


@pytest.fixture(scope="module")
def fused(tiny_bert_dir, tmp_path_factory):
    ctx = context(tmp_path_factory.mktemp("q"))
    exp = Export().run(load_model(str(tiny_bert_dir)), ctx)
    return Fuse().run(exp.artifact, ctx).artifact


def test_quantizes_fused_graph_and_reports_error(fused, tmp_path):
    result = DynamicInt8().run(fused, context(tmp_path))
    r = result.report
    assert r["quantized.QAttention"] == 2 and r["quantized.MatMulInteger"] == 6
    assert r["weights_quantized"] >= 6
    assert r["weight_sqnr_db.median"] > 30  # measured ~40 dB for per-channel int8
    assert r["calibration.mean_cosine"] > 0.99  # measured ~0.999 on the tiny model
    assert len(r["layer_errors"]) == 8  # 6 MatMul + 2 Attention (its QKV projection)
    assert 0 < r["layer_error.max"] < 0.05  # int8 weights and uint8 activations: ~1% measured


def test_exclude_keeps_layers_in_float_and_warns_on_unmatched(fused, tmp_path):
    ctx = context(tmp_path)
    r = DynamicInt8(exclude=["*layer.0/output/dense/MatMul", "no-such-*"]).run(fused, ctx).report
    assert r["excluded_nodes"] == 1 and r["float.MatMul"] == 1 and r["quantized.MatMulInteger"] == 5
    assert any("`no-such-*` matches no node" in w for w in ctx.reporter.warnings)


def test_excluding_everything_is_an_error_not_a_float_passthrough(fused, tmp_path):
    with pytest.raises(StageError, match="no layer was quantized"):
        DynamicInt8(exclude=["*"]).run(fused, context(tmp_path))


def test_refuses_an_already_quantized_model(fused, tmp_path):
    once = DynamicInt8().run(fused, context(tmp_path)).artifact
    with pytest.raises(StageError, match="already quantized"):
        DynamicInt8().run(once, context(tmp_path / "again"))


def test_min_cosine_guard_names_worst_layers(fused, tmp_path):
    with pytest.raises(StageError, match="Highest-error layers: /encoder"):
        DynamicInt8(min_cosine=1.0).run(fused, context(tmp_path))


def test_fallback_auto_requantizes_with_the_worst_layer_in_float(fused, tmp_path):
    errors = DynamicInt8().run(fused, context(tmp_path / "a")).report["layer_errors"]
    second, first = sorted(errors.values())[-2:]
    worst = max(errors, key=errors.get)
    r = DynamicInt8(fallback="auto", max_layer_error=(first + second) / 2).run(fused, context(tmp_path / "b")).report
    assert r["fallback_kept"] == 1 and f"fallback.{worst}" in r and worst not in r["layer_errors"]
    float_op = "Attention" if "attention/self" in worst.lower() or worst.startswith("Attention") else "MatMul"
    assert r[f"float.{float_op}"] == 1


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.integers(1, 8), st.floats(1e-3, 1e3))
def test_int8_round_trip_error_is_at_most_half_a_step(n, k, spread):
    """Symmetric per-channel int8: |w - dequant(quant(w))| <= scale / 2, the bound _broadcast relies on."""
    rng = np.random.default_rng(n * 31 + k)
    w = rng.normal(0, spread, size=(n, k))
    scale = np.abs(w).max(0) / 127
    q = np.clip(np.round(w / _broadcast(scale, w)), -127, 127)
    err = np.abs(w - q * _broadcast(scale, w))
    assert np.all(err <= _broadcast(scale, w) / 2 + 1e-9)
    assert sqnr_db(w, q * _broadcast(scale, w)) > 20


def test_sqnr_db():
    x = np.ones(100)
    assert sqnr_db(x, x) == float("inf")
    assert abs(sqnr_db(x, x * 1.1) - 20.0) < 1e-9  # noise = 1% of signal power -> 20 dB


@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quant_reproduces_ort_dynamic_int8(tiny_bert_dir, fused, tmp_path, per_channel):
    """prune.recover's int8 simulation must predict the quantized ORT graph's output, not just be noisy."""
    import onnxruntime as ort
    import torch

    from slimline.measure.inputs import calibration_batches
    from slimline.measure.quantsim import fake_quant_int8, resolve_reduce_range
    from tests.test_compile import TEXTS

    q = DynamicInt8(per_channel=per_channel).run(fused, context(tmp_path)).artifact
    model = load_model(str(tiny_bert_dir))
    (batch,) = calibration_batches(model.tokenizer, TEXTS[:8], batch=8)
    sess = ort.InferenceSession(str(q.path), providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name].numpy().astype(np.int64) for i in sess.get_inputs()}
    real = sess.run(None, feeds)[0]
    with torch.no_grad():
        plain = model.model(**batch)[0].numpy()
        with fake_quant_int8(model.model, per_channel, resolve_reduce_range("auto")) as counts:
            simulated = model.model(**batch)[0].numpy()
        restored = model.model(**batch)[0].numpy()
    assert counts["linear"] >= 12 and counts["embedding"] == 3
    np.testing.assert_array_equal(restored, plain)  # leaving the block restores the float forward
    sim_err, float_err = np.abs(simulated - real).max(), np.abs(plain - real).max()
    # Per-channel: the same integers, so with VNNI only float summation order differs (measured 7e-7
    # vs 0.025). Without VNNI, reduce_range: auto gives 7-bit weights, on which ORT's AVX2 u8s8 kernel
    # (vpmaddubsw) can't saturate: measured 9e-5 vs 0.026 there (8-bit weights saturated: 0.0095).
    # Per-tensor: ORT's QAttention shares one weight scale over Q, K and V together, the simulation
    # one per projection (measured 5e-4 vs 0.025).
    assert sim_err < float_err / (100 if per_channel else 10), (sim_err, float_err)
